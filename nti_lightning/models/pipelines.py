"""The pipeline types the package works with, and what tells them apart.

Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`) share
the VAE, UNet class, tokenizer and scheduler; SDXL adds a second text encoder and conditions its
UNet on a pooled text embedding and the image's size ("text_time" added conditioning). Code that
must treat them differently asks `is_sdxl` rather than testing classes, so a pipeline assembled
by hand from SDXL components is recognised too.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging

#: Any pipeline `load_pipeline` returns.
Pipeline = Union[StableDiffusionPipeline, StableDiffusionXLPipeline]


def is_sdxl(pipeline: Any) -> bool:
    """Whether `pipeline` is SDXL-shaped: it has a second text encoder, or its UNet takes SDXL's
    added "text_time" conditioning (pooled text embedding and size/crop ids).

    Args:
        pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`): the pipeline to test.
    """
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return True
    unet = getattr(pipeline, "unet", None)
    return unet is not None and unet.config.get("addition_embed_type") == "text_time"


def vae_stays_fp32(pipeline: Any, torch_dtype: torch.dtype | None) -> bool:
    """Whether casting `pipeline` to `torch_dtype` must leave its VAE in fp32.

    SDXL's VAE overflows in fp16 (its activations exceed 65504 and decode to NaN/black images);
    its config says so with `force_upcast: true`. A VAE fine-tuned to be fp16-safe (such as
    madebyollin's `sdxl-vae-fp16-fix`) has `force_upcast: false` and may run in fp16. bf16 has
    fp32's range, so only fp16 is concerned. SD 1.x/2.x VAEs are left alone: diffusers' default
    `force_upcast=True` is set on them as well, without the overflow.

    Args:
        pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`): the pipeline to cast.
        torch_dtype (`torch.dtype`, *optional*): the dtype the other networks get.
    """
    vae = getattr(pipeline, "vae", None)
    return (
        torch_dtype == torch.float16
        and vae is not None
        and is_sdxl(pipeline)
        and bool(vae.config.get("force_upcast", False))
    )


def cast_pipeline(pipeline: Pipeline, torch_dtype: torch.dtype) -> Pipeline:
    """Casts every network of `pipeline` to `torch_dtype`, except an SDXL VAE that overflows in
    fp16 (`vae_stays_fp32`), which is put in fp32. Returns the same pipeline.

    Args:
        pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`): the pipeline to cast.
        torch_dtype (`torch.dtype`): the weights' dtype.
    """
    vae_dtype = torch.float32 if vae_stays_fp32(pipeline, torch_dtype) else torch_dtype
    with _quiet_diffusers():
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                component.to(dtype=vae_dtype if name == "vae" else torch_dtype)
    return pipeline


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Hides diffusers' warnings. Its `ModelMixin.to(dtype)` warns on every cast that "modules
    should be kept in float32: []" even when, as here, there are none."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
