"""A seeded, Stable-Diffusion-shaped pipeline small enough for tests and CPU demos.

Same component classes as SD 1.x (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel, CLIP's real BPE tokenizer, SD's scheduler config), random weights from a seed.
It proves the mechanics; its reconstructions are not pictures of anything.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from nti_lightning.models.seeding import seeded_build
from nti_lightning.models.tokenizer import VOCAB_SIZE, clip_tokenizer

#: Stable Diffusion 1.x's scheduler config.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


def tiny_vae(resolution: int, **config: Any) -> AutoencoderKL:
    """The tiny models' VAE: 3 levels, 4 latent channels, images 4x the latents' side.

    Args:
        resolution (`int`): image side in pixels written into its config.
        **config: further `AutoencoderKL` settings (SDXL's scaling factor and `force_upcast`).
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        **config,
    )


def tiny_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    resolution: int = 32,
    text_width: int = 32,
) -> StableDiffusionPipeline:
    """Builds the seeded tiny pipeline.

    Args:
        seed (`int`, defaults to 0): seeds all random weights; the same seed gives the same model.
        prediction_type (`str`, defaults to "epsilon"): "epsilon" or "v_prediction" (SD 2.x style).
        resolution (`int`, defaults to 32): image side in pixels; latents are `resolution // 4`.
        text_width (`int`, defaults to 32): text-encoder width D (SD 1.x: 768).
    """
    with seeded_build(seed):
        unet = UNet2DConditionModel(
            sample_size=resolution // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_width,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = tiny_vae(resolution)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    return assemble_pipeline(vae, unet, text_encoder, prediction_type)


def assemble_pipeline(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline from its three networks (put in eval mode), with CLIP's
    tokenizer (built offline) and SD 1.x's scheduler config; no safety checker.

    Args:
        vae (`AutoencoderKL`): the autoencoder.
        unet (`UNet2DConditionModel`): the denoiser.
        text_encoder (`CLIPTextModel`): the text encoder.
        prediction_type (`str`, defaults to "epsilon"): "epsilon" or "v_prediction".
    """
    pipeline = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
