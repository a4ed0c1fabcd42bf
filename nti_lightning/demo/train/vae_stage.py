"""The first stage: `VAEStage` trains the `AutoencoderKL`, and the measurements of its result.

After the stage, `latent_scaling_factor` gives the factor that makes the training latents unit
variance (as SD's 0.18215 was chosen) and `heldout_vae_psnr` the round-trip quality on held-out
images, both recorded in the training summary.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from nti_lightning.data.images import to_tensor
from nti_lightning.demo.shapes import heldout_samples, make_sample
from nti_lightning.demo.train.components import warmup_cosine
from nti_lightning.demo.train.config import DemoConfig
from nti_lightning.inversion.report import image_metrics
from nti_lightning.models import vae as vae_codec


class VAEStage(pl.LightningModule):
    """Trains an `AutoencoderKL` to reconstruct images: MSE + L1 on pixels, plus `kl_weight`·KL.

    The decoder is trained on posterior samples (not the mean), so that it also decodes the
    slightly-off latents a diffusion sampler produces.

    With `locality_weight`, from `locality_start` of the steps on, half of each batch also trains
    the decoder to decode the background from the background's latents alone: the latents of the
    shape's region (at the latent resolution, grown by one cell as LocalBlend grows its masks) are
    replaced by those of the same picture with the shape in another colour, pushed past it by a
    random factor in [1, 2] (guided sampling overshoots colours like this), and the loss counts the
    pixels outside that region, whose target is the original background. The decoder's GroupNorm
    statistics and attention are global, so without this an edited region can shift the colour of
    the whole decoded background even where the latents are untouched.

    Args:
        vae (`AutoencoderKL`): the autoencoder to train (in place).
        learning_rate (`float`, defaults to 1e-3): peak AdamW rate.
        kl_weight (`float`, defaults to 1e-6): KL weight (per latent element).
        warmup_steps (`int`, defaults to 200): linear warm-up steps.
        total_steps (`int`, defaults to 3200): steps of the stage (cosine decay length).
        locality_weight (`float`, defaults to 1.0): weight of the background-locality loss; 0
            turns it off.
        locality_start (`float`, defaults to 0.25): fraction of `total_steps` after which it is on.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        learning_rate: float = 1e-3,
        kl_weight: float = 1e-6,
        warmup_steps: int = 200,
        total_steps: int = 3200,
        locality_weight: float = 1.0,
        locality_start: float = 0.25,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.learning_rate = learning_rate
        self.kl_weight = kl_weight
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.locality_weight = locality_weight
        self.locality_start = locality_start

    def training_step(self, batch: dict[str, Any], batch_index: int) -> torch.Tensor:
        pixels = batch["pixels"]
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample()
        reconstruction = self.vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, pixels)
        l1 = F.l1_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + l1 + self.kl_weight * kl
        logs = {"vae/mse": mse, "vae/kl": kl}
        if self.locality_weight > 0 and self.global_step >= self.locality_start * self.total_steps:
            locality = self.locality_loss(latents.detach(), batch)
            loss = loss + self.locality_weight * locality
            logs["vae/locality"] = locality
        # PSNR of [-1, 1] pixels: a data range of 2.
        logs["vae/psnr"] = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))
        self.log_dict({"vae/loss": loss, **logs}, prog_bar=True)
        return loss

    def locality_loss(self, latents: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """MSE + L1 outside the shape's region of the decoded region-swapped latents (see above).

        Args:
            latents (`torch.Tensor`): `[B, C, h, w]` posterior samples of the batch's pixels.
            batch (`dict`): the batch (`pixels`, `coverage`, `recoloured`).
        """
        half = max(1, latents.shape[0] // 2)
        pixels, latents = batch["pixels"][:half], latents[:half]
        with torch.no_grad():
            other = self.vae.encode(batch["recoloured"][:half]).latent_dist.sample()
        region = F.interpolate(batch["coverage"][:half], size=latents.shape[-2:], mode="area") > 0
        region = F.max_pool2d(region.float(), 3, stride=1, padding=1)
        overshoot = 1 + torch.rand(half, 1, 1, 1, device=latents.device)
        decoded = self.vae.decode(latents + region * overshoot * (other - latents)).sample
        outside = 1 - F.interpolate(region, size=pixels.shape[-2:], mode="nearest")
        error = (decoded - pixels) * outside
        count = outside.sum().clamp_min(1) * pixels.shape[1]
        return (error.square().sum() + error.abs().sum()) / count

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.learning_rate, weight_decay=0.0)
        scheduler = warmup_cosine(optimizer, self.warmup_steps, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, config: DemoConfig, seed: int, count: int = 512) -> float:
    """1 / std of the VAE's (sampled) latents over `count` training images: unit-variance latents.

    Args:
        vae (`AutoencoderKL`): the trained VAE.
        config (`DemoConfig`): the settings (resolution).
        seed (`int`): the training stream.
        count (`int`, defaults to 512): images measured.
    """
    pixels = torch.stack([to_tensor(make_sample(i, "train", seed, config.resolution).image) for i in range(count)])
    latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(128)])
    return float(1.0 / latents.std())


@torch.no_grad()
def heldout_vae_psnr(vae: AutoencoderKL, config: DemoConfig, count: int = 64) -> float:
    """Mean PSNR (dB, [0, 1] images) of the VAE round trip (posterior mean) of held-out images.

    Args:
        vae (`AutoencoderKL`): the VAE, with its `scaling_factor` set.
        config (`DemoConfig`): the settings (resolution).
        count (`int`, defaults to 64): held-out images measured.
    """
    pixels = torch.stack([to_tensor(sample.image) for sample in heldout_samples(count, resolution=config.resolution)])
    decoded = vae_codec.decode(vae, vae_codec.encode(vae, pixels))
    psnr, _ = image_metrics(decoded, pixels / 2 + 0.5)
    return float(psnr.mean())
