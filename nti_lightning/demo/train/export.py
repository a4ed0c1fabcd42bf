"""`save_fp16`: writes the trained pipeline as the diffusers folder that ships (fp16 safetensors, no tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline


def save_fp16(pipeline: StableDiffusionPipeline, output: str | Path) -> None:
    """Writes `pipeline` as a diffusers folder with fp16 safetensors weights, without the tokenizer.

    The tokenizer files (2 MB) are left out: `clip_tokenizer()` rebuilds the same tokenizer from
    the merge list the package already ships.

    Args:
        pipeline (`StableDiffusionPipeline`): the pipeline (not modified: a half copy is saved).
        output (`str` or `Path`): the folder (created; existing files of the same names replaced).
    """
    output = Path(output)
    parts = {name: getattr(pipeline, name) for name in ("vae", "unet", "text_encoder")}
    states = {name: {k: v.clone() for k, v in part.state_dict().items()} for name, part in parts.items()}
    try:
        for part in parts.values():
            part.to(torch.float16)
        pipeline.save_pretrained(output, safe_serialization=True)
    finally:
        for name, part in parts.items():
            part.to(torch.float32).load_state_dict(states[name])
    shutil.rmtree(output / "tokenizer", ignore_errors=True)
