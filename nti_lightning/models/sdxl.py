"""SDXL-shaped pipelines without a download: a tiny one for tests, and SDXL base's exact architecture.

`tiny_xl_pipeline` has the structure of Stable Diffusion XL (two CLIP text encoders whose hidden
states are concatenated for cross-attention, a pooled text embedding and size/crop ids as the
UNet's added "text_time" conditioning, a VAE that must stay in fp32, tokenizer_2 padding with
"!") at a size that runs in milliseconds on a CPU. `sdxl_random_pipeline` has the component
configs of `stabilityai/stable-diffusion-xl-base-1.0`, hence its shapes, parameter counts and
compute per UNet call, with seeded random weights: use it to time things and to check memory,
never to judge quality.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from nti_lightning.models.pipelines import cast_pipeline
from nti_lightning.models.sd15 import SD15_TEXT_CONFIG, SD15_VAE_CONFIG
from nti_lightning.models.seeding import seeded_build
from nti_lightning.models.tiny import tiny_vae
from nti_lightning.models.tokenizer import VOCAB_SIZE, clip_tokenizer

#: SDXL base's `unet/config.json` (the keys that differ from diffusers' defaults, and the key ones
#: that do not). `attention_head_dim` is diffusers' legacy name for the number of heads (heads of
#: 64 channels at every level); the first level has no attention at all.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "upcast_attention": None,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # 6 size/crop ids x 256 Fourier features + text_encoder_2's 1280-wide pooled embedding.
    "projection_class_embeddings_input_dim": 2816,
}

#: SDXL's `vae/config.json`: SD 1.x's VAE layout (SDXL retrained its weights), a new latent scale,
#: and `force_upcast` because it overflows in fp16.
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

#: SDXL's `text_encoder`: the text tower of OpenAI's CLIP ViT-L/14, the same network as SD 1.x's.
SDXL_TEXT_CONFIG: dict[str, Any] = dict(SD15_TEXT_CONFIG)

#: SDXL's `text_encoder_2`: the text tower of OpenCLIP ViT-bigG/14 (LAION-2B), with its projection
#: (the pooled embedding SDXL's UNet gets). Its pad id is tokenizer_2's ("!", id 0); as for the
#: first encoder, bos/eos are CLIP's real ids rather than the hub config's placeholders 0/2/1.
SDXL_TEXT_2_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 0,
}

#: SDXL base's `scheduler/scheduler_config.json` (the hub's class is `EulerDiscreteScheduler`;
#: `interpolation_type`, `use_karras_sigmas` and `skip_prk_steps` are Euler's own keys, which a
#: `DDIMScheduler` built from it keeps in its config and ignores). The noise schedule is SD 1.x's.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "sample_max_value": 1.0,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "skip_prk_steps": True,
}

#: Parameter counts of `stabilityai/stable-diffusion-xl-base-1.0`'s networks, which the configs
#: above reproduce exactly (tests check them on the meta device).
SDXL_PARAMETERS: dict[str, int] = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}


def clip_tokenizer_2(model_max_length: int = 77) -> CLIPTokenizer:
    """SDXL's `tokenizer_2`: CLIP's tokenizer (OpenCLIP bigG uses the same BPE vocabulary) padding
    with "!" (id 0), as OpenCLIP's own tokenizer does, instead of "<|endoftext|>". The pooled
    embedding is read at the first end-of-text token, so this padding is what the network saw.

    Args:
        model_max_length (`int`, defaults to 77): the padded/truncated prompt length.
    """
    tokenizer = clip_tokenizer(model_max_length)
    tokenizer.pad_token = "!"  # already in the vocabulary: no token is added
    return tokenizer


def sdxl_unet(sample_size: Optional[int] = None) -> UNet2DConditionModel:
    """SDXL base's UNet with freshly initialised weights on the current default device.

    Args:
        sample_size (`int`, *optional*): latent side recorded in the config (the default
            generation size); SDXL's 128 when not given. It does not change any weight.
    """
    config = dict(SDXL_UNET_CONFIG)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return UNet2DConditionModel(**config)


def sdxl_vae(sample_size: Optional[int] = None) -> AutoencoderKL:
    """SDXL's VAE with freshly initialised weights on the current default device.

    Args:
        sample_size (`int`, *optional*): image side recorded in the config; SDXL's 1024 when not
            given. It does not change any weight.
    """
    config = dict(SDXL_VAE_CONFIG)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return AutoencoderKL(**config)


def sdxl_text_encoder() -> CLIPTextModel:
    """CLIP ViT-L/14's text encoder (SDXL's `text_encoder`), freshly initialised on the current default device."""
    return CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIG))


def sdxl_text_encoder_2() -> CLIPTextModelWithProjection:
    """OpenCLIP ViT-bigG/14's text encoder (SDXL's `text_encoder_2`), freshly initialised on the
    current default device."""
    return CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2_CONFIG))


def assemble_xl_pipeline(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline from its four networks (put in eval mode), with CLIP's tokenizers (built
    offline) and a DDIM scheduler on SDXL's noise schedule.

    Args:
        vae (`AutoencoderKL`): the autoencoder.
        unet (`UNet2DConditionModel`): the denoiser, with "text_time" added conditioning.
        text_encoder (`CLIPTextModel`): the first text encoder (hidden states only).
        text_encoder_2 (`CLIPTextModelWithProjection`): the second text encoder (hidden states and
            the pooled, projected embedding).
    """
    pipeline = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer_2(),
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        # SDXL base's setting: an empty negative prompt is a zero embedding, not the encoded "".
        force_zeros_for_empty_prompt=True,
        # Never watermark (and never need the `invisible-watermark` package, even where installed).
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tiny_xl_pipeline(seed: int = 0, resolution: int = 32) -> StableDiffusionXLPipeline:
    """Builds a seeded, SDXL-shaped pipeline small enough for tests and CPU demos.

    Text encoders of widths 32 and 64 (2 layers each, so the penultimate hidden state SDXL uses
    is a real layer's), a 32-wide pooled projection, a UNet with cross-attention (1 then 2
    transformer layers) at both of its 2 levels like SDXL's two attention resolutions, and a
    3-level VAE (latents `resolution // 4`). Its outputs are not pictures of anything.

    Args:
        seed (`int`, defaults to 0): seeds all random weights; the same seed gives the same model.
        resolution (`int`, defaults to 32): image side in pixels; latents are `resolution // 4`.
    """
    text_widths = (32, 64)
    pooled_width = 32
    time_embed_dim = 8  # Fourier features per size/crop id (SDXL: 256)
    with seeded_build(seed):
        unet = UNet2DConditionModel(
            sample_size=resolution // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),  # heads, of 16 channels each (SDXL: 64)
            use_linear_projection=True,
            # SDXL concatenates both encoders' hidden states along the channels.
            cross_attention_dim=sum(text_widths),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 ids (original size, crop top-left, target size) + the pooled text embedding.
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
            norm_num_groups=8,
        )
        vae = tiny_vae(resolution, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
        text_config = {
            "vocab_size": VOCAB_SIZE,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        }
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **text_config,
                hidden_size=text_widths[0],
                intermediate_size=2 * text_widths[0],
                pad_token_id=49407,
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                **text_config,
                hidden_size=text_widths[1],
                intermediate_size=2 * text_widths[1],
                projection_dim=pooled_width,
                hidden_act="gelu",
                pad_token_id=0,
            )
        )
    return assemble_xl_pipeline(vae, unet, text_encoder, text_encoder_2)


def sdxl_random_pipeline(
    seed: int = 0,
    torch_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    resolution: Optional[int] = None,
) -> StableDiffusionXLPipeline:
    """Builds an SDXL base-shaped pipeline with seeded random weights (no download).

    Args:
        seed (`int`, defaults to 0): seeds all random weights. The same seed on the same kind of
            device gives the same model; CPU and CUDA random streams differ, so weights built on
            one do not equal those built on the other.
        torch_dtype (`torch.dtype`, *optional*): dtype of the weights; defaults to fp32. The
            weights are initialised in fp32 and then cast, so every dtype sees the same values.
            With fp16 the VAE stays fp32, as SDXL's VAE overflows in fp16 (`force_upcast`).
        device (`str` or `torch.device`, *optional*): where the weights are created, e.g.
            "cuda" (no 14 GB host copy to make and transfer) or "meta" (shapes only, no memory).
            Defaults to the CPU.
        resolution (`int`, *optional*): default image side in pixels written into the UNet and
            VAE configs (SDXL's 1024 when not given), e.g. 256 for a CPU smoke test. A multiple
            of 8; it changes no weight's shape.
    """
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    # Each parameter is allocated and initialised on `device` directly: no CPU copy to move.
    with seeded_build(seed, device if device is not None else "cpu"):
        unet = sdxl_unet(None if resolution is None else resolution // 8)
        vae = sdxl_vae(resolution)
        text_encoder = sdxl_text_encoder()
        text_encoder_2 = sdxl_text_encoder_2()
    pipeline = assemble_xl_pipeline(vae, unet, text_encoder, text_encoder_2)
    if torch_dtype is not None:
        cast_pipeline(pipeline, torch_dtype)
    return pipeline
