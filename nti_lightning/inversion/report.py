"""Reconstruction quality of finished inversions: PSNR/SSIM and the comparison grid.

For each image: the input, its VAE round trip (the best any latent-space method can do), the
plain DDIM reconstruction at w = 7.5 from the pivot's `z_T` with the `""` embedding (what the
paper shows fails), and the null-text reconstruction.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.inversion.sampling import sample
from nti_lightning.models import vae as vae_codec


def image_metrics(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of `[B, 3, H, W]` images in [0, 1]."""
    prediction, target = prediction.float(), target.float()
    psnr = peak_signal_noise_ratio(prediction, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(prediction, target, data_range=1.0, reduction="none")
    return psnr.reshape(-1), ssim.reshape(-1)


def latent_error(latents: torch.Tensor, source_latents: torch.Tensor) -> torch.Tensor:
    """Per-image relative L2 error `‖ẑ0 - z0‖ / ‖z0‖` of reconstructed latents: what the inversion
    itself controls, independent of how good the VAE's decoder is."""
    difference = (latents.float() - source_latents.float()).flatten(1).norm(dim=1)
    return difference / source_latents.float().flatten(1).norm(dim=1)


@torch.no_grad()
def ddim_reconstruction(
    unet: UNet2DConditionModel,
    schedule: DDIMSchedule,
    z_T: torch.Tensor,
    empty: Condition,
    cond: Condition,
    guidance_scale: float,
) -> torch.Tensor:
    """Sampling from the pivot's `z_T` with ∅ (one row, the pipeline's own unconditional input) at
    every step: DDIM inversion without null-text."""
    return sample(unet, schedule, z_T, [empty] * schedule.num_inference_steps, cond, guidance_scale)


@torch.no_grad()
def reconstruction_report(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    source_latents: torch.Tensor,
    null_text_latents: torch.Tensor,
    ddim_latents: torch.Tensor | None = None,
) -> tuple[list[dict[str, float]], torch.Tensor]:
    """Metrics per image and `[B, 3, H, k·W]` grids (input | VAE | DDIM | null-text).

    Args:
        vae (`AutoencoderKL`): the pipeline's VAE.
        pixels (`torch.Tensor`): `[B, 3, H, W]` inputs in [-1, 1].
        source_latents (`torch.Tensor`): `[B, C, h, w]` VAE latents of the inputs.
        null_text_latents (`torch.Tensor`): `[B, C, h, w]` null-text reconstructions at t = 0.
        ddim_latents (`torch.Tensor`, *optional*): `[B, C, h, w]` DDIM-only reconstructions.
    """
    target = (pixels.float() / 2 + 0.5).clamp(0, 1).to(source_latents.device)
    vae_images = vae_codec.decode(vae, source_latents)
    null_text_images = vae_codec.decode(vae, null_text_latents)
    columns = [target, vae_images]
    metrics: dict[str, torch.Tensor] = {}
    metrics["vae_psnr"], metrics["vae_ssim"] = image_metrics(vae_images, target)
    metrics["psnr"], metrics["ssim"] = image_metrics(null_text_images, target)
    metrics["psnr_vs_vae"], metrics["ssim_vs_vae"] = image_metrics(null_text_images, vae_images)
    metrics["latent_error"] = latent_error(null_text_latents, source_latents)
    if ddim_latents is not None:
        ddim_images = vae_codec.decode(vae, ddim_latents)
        metrics["ddim_psnr"], metrics["ddim_ssim"] = image_metrics(ddim_images, target)
        metrics["ddim_latent_error"] = latent_error(ddim_latents, source_latents)
        columns.append(ddim_images)
    columns.append(null_text_images)
    grids = torch.cat(columns, dim=3).cpu()
    rows = [{name: float(values[b]) for name, values in metrics.items()} for b in range(pixels.shape[0])]
    return rows, grids
