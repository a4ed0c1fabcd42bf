"""`model_fingerprint`: which weights an artifact was made with, in 16 hex digits.

Two models of the same shape (`tiny` and `shapes`, or two fine-tunes of SD 1.5) accept each
other's artifacts without any shape error, and the edit is garbage. Artifacts therefore record a
hash of the weights; `reconstruct`, `edit`, `nti predict` and resume compare it with the model's.

The hash reads a fixed handful of tensors (the first, middle and last of the UNet, the text
encoder and the VAE, by sorted name), at most 4096 values of each, rounded to bfloat16 so that
the same weights loaded in fp32, fp16 or bf16 agree. It costs well under a millisecond for an SD
model and is computed once per loaded UNet.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

#: Values of each sampled tensor that enter the hash.
SAMPLED_VALUES = 4096

_cache: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def model_fingerprint(unet: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module) -> str:
    """The fingerprint of a pipeline's weights (cached per UNet object: weights are frozen here)."""
    if unet in _cache:
        return _cache[unet]
    digest = hashlib.sha256()
    for part in (unet, text_encoder, vae):
        tensors = dict(part.named_parameters())
        names = sorted(tensors)
        for name in sorted({names[0], names[len(names) // 2], names[-1]}) if names else []:
            values = tensors[name].detach().reshape(-1)[:SAMPLED_VALUES]
            digest.update(f"{name}{tuple(tensors[name].shape)}".encode())
            digest.update(values.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    _cache[unet] = digest.hexdigest()[:16]
    return _cache[unet]


def pipeline_fingerprint(pipeline: Any) -> str:
    """`model_fingerprint` of a diffusers pipeline's UNet, text encoder and VAE."""
    return model_fingerprint(pipeline.unet, pipeline.text_encoder, pipeline.vae)


def model_reference(pipeline: Any) -> str:
    """The name recorded in artifacts: the pipeline's source path or hub id when known."""
    return str(getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path", "") or "in-memory")
