"""Loading a Stable Diffusion pipeline from a name, a hub id, a folder or a checkpoint file."""

from __future__ import annotations

import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from nti_lightning.diffusion.ddim import ddim_scheduler
from nti_lightning.errors import ModelError, ModelNotFoundError
from nti_lightning.models.sd15 import sd15_random_pipeline
from nti_lightning.models.tiny import tiny_pipeline
from nti_lightning.models.tokenizer import clip_tokenizer


def shapes_pipeline(torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The trained `shapes` model shipped in the package (32 px coloured shapes; see docs/SHAPES_MODEL.md).

    Its weights are stored in fp16 and upcast to `torch_dtype`. The folder holds no tokenizer
    files: like any such folder, it gets CLIP's tokenizer, rebuilt offline by `clip_tokenizer()`.

    Args:
        torch_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the loaded weights.
    """
    with resources.as_file(resources.files("nti_lightning.assets") / "shapes") as folder:
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(f"{folder}: the shipped 'shapes' model is missing (no model_index.json)")
        return _load_external(str(folder), torch_dtype)

#: Names resolved without any download.
BUILTIN_MODELS = {
    "tiny": lambda: tiny_pipeline(seed=0),
    "tiny-v": lambda: tiny_pipeline(seed=0, prediction_type="v_prediction"),
    "shapes": shapes_pipeline,
    "sd15-random": lambda: sd15_random_pipeline(seed=0),
}


def load_pipeline(pretrained: str, torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Loads a Stable Diffusion pipeline with the DDIM scheduler the algorithm uses.

    Args:
        pretrained (`str`): one of
            - a built-in name: "tiny" (seeded random SD-shaped model) or "tiny-v" (its
              v-prediction twin); "sd15-random" (Stable Diffusion 1.5's architecture with
              seeded random weights, for benchmarks); "shapes" (a small model trained on
              coloured shapes, shipped in the package, see docs/SHAPES_MODEL.md);
            - a local diffusers folder (`model_index.json` inside; one without a `tokenizer`
              folder, as `nti train-demo` writes, gets CLIP's tokenizer);
            - a single-file `.safetensors` checkpoint (original SD layout);
            - a hub id such as "CompVis/stable-diffusion-v1-4" (needs network or a warm cache).
        torch_dtype (`torch.dtype`, *optional*): dtype for the weights; defaults to fp32.
    """
    if pretrained in BUILTIN_MODELS:
        pipeline = BUILTIN_MODELS[pretrained]()
        if torch_dtype is not None:
            pipeline = pipeline.to(dtype=torch_dtype)  # DiffusionPipeline.to ignores a `torch_dtype` keyword
        # Artifacts record a built-in model by its name rather than "in-memory" or an install path.
        pipeline.register_to_config(_name_or_path=pretrained)
    else:
        pipeline = _load_external(pretrained, torch_dtype)
    pipeline.scheduler = ddim_scheduler(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """Hides diffusers' and transformers' per-component loading bars (a run has its own progress)."""
    libraries = (diffusers_logging, transformers.utils.logging)
    were_enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, enabled in zip(libraries, were_enabled):
            if enabled:
                library.enable_progress_bar()


def _load_external(pretrained: str, torch_dtype: torch.dtype | None) -> StableDiffusionPipeline:
    """`load_pipeline` for anything but a built-in name."""
    with _no_loading_bars():
        try:
            return _load_from(pretrained, torch_dtype)
        except ModelError:
            raise
        except (OSError, ValueError) as error:  # no such hub id, no network, a broken folder or file
            raise ModelError(f"{pretrained}: cannot load the model ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from error


def _load_from(pretrained: str, torch_dtype: torch.dtype | None) -> StableDiffusionPipeline:
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype  # diffusers' current name; `torch_dtype` is deprecated
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        if not (path / "tokenizer").is_dir():
            # Folders written by `nti train-demo` leave CLIP's tokenizer out (it is rebuilt
            # offline); without this, transformers builds one with no length limit.
            kwargs["tokenizer"] = clip_tokenizer()
        return StableDiffusionPipeline.from_pretrained(path, **kwargs)
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        # These are pickles: loading one runs arbitrary code from whoever made it.
        raise ModelError(
            f"{path}: pickled checkpoints are not loaded; convert it to .safetensors "
            "(or a diffusers folder) and pass that instead"
        )
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: checkpoint file not found")
        return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    if path.exists() or pretrained.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{pretrained}: neither a diffusers folder nor a .safetensors checkpoint")
    return StableDiffusionPipeline.from_pretrained(pretrained, **kwargs)
