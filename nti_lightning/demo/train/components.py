"""The untrained parts of the `shapes` model and the learning-rate schedule both stages use.

`build_vae`, `build_unet` and `build_text_encoder` make randomly initialised diffusers/transformers
modules of a `DemoConfig`'s shape (seed torch first: the weights come from its generator);
`warmup_cosine` is the linear warm-up then cosine decay of every stage's AdamW rate.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from nti_lightning.demo.train.config import DemoConfig
from nti_lightning.models.tokenizer import VOCAB_SIZE


def build_vae(config: DemoConfig) -> AutoencoderKL:
    """A randomly initialised `AutoencoderKL` of `config`'s shape (seed torch first).

    Args:
        config (`DemoConfig`): the architecture.
    """
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.resolution,
        mid_block_add_attention=config.vae_attention,
    )


def build_unet(config: DemoConfig) -> UNet2DConditionModel:
    """A randomly initialised `UNet2DConditionModel` of `config`'s shape (seed torch first).

    Cross-attention runs in the first down block, the middle block and the last up block: at the
    latent's full resolution (where Prompt-to-Prompt's LocalBlend reads its masks) and at the
    coarsest one.

    Args:
        config (`DemoConfig`): the architecture.
    """
    blocks = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (blocks - 1),
        up_block_types=("UpBlock2D",) * (blocks - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,  # diffusers reads it as the number of heads here
        norm_num_groups=config.norm_groups,
    )


def build_text_encoder(config: DemoConfig) -> CLIPTextModel:
    """A randomly initialised `CLIPTextModel` over CLIP's full 49,408-token vocabulary.

    Args:
        config (`DemoConfig`): the architecture.
    """
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's rate over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer.
        warmup_steps (`int`): warm-up length.
        total_steps (`int`): steps of the whole stage.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
