"""Pixels <-> latents with the pipeline's VAE (`latent_dist.mean`, not a sample, as the reference).

The VAE always runs in its own dtype, never under autocast: SDXL's VAE overflows in fp16, so it is
kept in fp32 (see `nti_lightning.models.loading`) and must not be cast down by a `16-mixed` run.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """`z0 = vae.encode(x).latent_dist.mean · scaling_factor` for `[B, 3, H, W]` pixels in [-1, 1]; fp32."""
    with torch.autocast(device_type=vae.device.type, enabled=False):
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float() * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` fp32 pixels in [0, 1] for latents from `encode` or a sampler."""
    latents = latents / vae.config.scaling_factor
    with torch.autocast(device_type=vae.device.type, enabled=False):
        pixels = vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.float()
    return (pixels / 2 + 0.5).clamp(0, 1)


def resolution(vae: AutoencoderKL, sample_size: int) -> int:
    """Image side in pixels for a UNet of latent size `sample_size`."""
    return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
