"""Stable Diffusion 1.5's exact architecture with seeded random weights, for benchmarks.

The component configs below are those of `stable-diffusion-v1-5/stable-diffusion-v1-5` (UNet,
VAE, and the text tower of OpenAI's CLIP ViT-L/14), so a pipeline built here has SD 1.5's shapes,
parameter counts and compute per UNet call, without downloading 4 GB of weights. Its outputs are
meaningless: use it to time things, never to judge quality.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from nti_lightning.models.pipelines import cast_pipeline
from nti_lightning.models.seeding import seeded_build
from nti_lightning.models.tiny import assemble_pipeline
from nti_lightning.models.tokenizer import VOCAB_SIZE

#: SD 1.5's `unet/config.json` (the keys that differ from diffusers' defaults, and the key ones that do not).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: SD 1.x's `vae/config.json`.
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: The text tower of `openai/clip-vit-large-patch14`, SD 1.x's text encoder. The special-token ids
#: are CLIP's real ones (the hub config carries legacy placeholders 0/2/1); they only choose the
#: pooled token, which Stable Diffusion does not use.
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet with freshly initialised weights on the current default device."""
    return UNet2DConditionModel(**SD15_UNET_CONFIG)


def sd15_vae() -> AutoencoderKL:
    """SD 1.x's VAE with freshly initialised weights on the current default device."""
    return AutoencoderKL(**SD15_VAE_CONFIG)


def sd15_text_encoder() -> CLIPTextModel:
    """CLIP ViT-L/14's text encoder with freshly initialised weights on the current default device."""
    return CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))


def sd15_random_pipeline(
    seed: int = 0,
    torch_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> StableDiffusionPipeline:
    """Builds a Stable Diffusion 1.5-shaped pipeline with seeded random weights (no download).

    Args:
        seed (`int`, defaults to 0): seeds all random weights. The same seed on the same kind of
            device gives the same model; CPU and CUDA random streams differ, so weights built on
            one do not equal those built on the other.
        torch_dtype (`torch.dtype`, *optional*): dtype of the weights; defaults to fp32. The
            weights are initialised in fp32 and then cast, so every dtype sees the same values.
        device (`str` or `torch.device`, *optional*): where the weights are created, e.g.
            "cuda" (no 4 GB host copy to make and transfer) or "meta" (shapes only, no memory).
            Defaults to the CPU.
    """
    # Each parameter is allocated and initialised on `device` directly: no CPU copy to move.
    with seeded_build(seed, device if device is not None else "cpu"):
        unet = sd15_unet()
        vae = sd15_vae()
        text_encoder = sd15_text_encoder()
    pipeline = assemble_pipeline(vae, unet, text_encoder)
    if torch_dtype is not None:
        cast_pipeline(pipeline, torch_dtype)
    return pipeline
