"""Pix2Pix-Zero's DDIM inversion (Parmar et al., SIGGRAPH 2023): a DDIM inversion at w = 1 whose
noise predictions are regularised towards white noise.

As PnP Inversion's `models/pix2pix_zero/ddim_inv.py` (`DDIMInversion.__call__`, after
pix2pixzero/pix2pix-zero `src/utils/ddim_inv.py`) runs it for the benchmark's Pix2Pix-Zero rows:
at each inversion step the prediction ε under the source prompt (their caption) takes
`num_reg_steps` rounds of `num_ac_rolls` gradient steps on its auto-correlation loss (each
channel's correlation with itself shifted by a random amount, on a pyramid of 2x average-pooled
maps down to 8x8, step `lambda_ac / num_ac_rolls`) and one on its KL divergence from N(0, 1)
(step `lambda_kl`), then the inverse step with their scheduler's levels: from `ā[t - 1]` to
`ā[t + Δ - 1]` (`ā[999]` past the last), one index off the sampler's `ā[t]`
(`models/pix2pix_zero/scheduler.py`, `DDIMInverseScheduler.step(reverse=True)`).

The shifts are Python's `random.randrange` as theirs; here each image's come from its own
generator seeded with `seed` and its id, so an image's inversion depends on nothing else (not its
batch, rank or order). Their latent is one draw of the VAE's posterior; here it is the posterior's
mean, as every method's (`nti fit`'s). The walk makes no UNet call (the inversion is made whole
beforehand); the artifact keeps the trajectory (`pivot_latents`), which the Pix2Pix-Zero editor's
`retrace` follows as PnP Inversion's Direct + Pix2Pix-Zero row does. Edits start from its z_T with
∅ as every step's null, as DDIM's.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule, _ddim_move, to_epsilon
from nti_lightning.diffusion.guidance import predict
from nti_lightning.errors import OptionError
from nti_lightning.inversion.methods.base import InversionMethod, is_count, is_number
from nti_lightning.inversion.methods.ddpm import image_seed
from nti_lightning.inversion.pivot import PivotTrajectory


def auto_correlation_loss(noise: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The authors' `auto_corr_loss` of one image's `[C, h, w]` noise: per channel, on the map and its
    2x average-pooled versions down to 8x8, the squared mean of its product with itself rolled by a
    random amount along each axis.

    Args:
        noise (`torch.Tensor`): `[C, h, w]`, differentiable.
        rng (`random.Random`): the shifts' generator (consumed as the authors' global one).
    """
    loss = noise.new_zeros(())
    for channel in range(noise.shape[0]):
        level = noise[channel][None, None]
        while True:
            shift = rng.randrange(level.shape[2] // 2)
            loss = loss + (level * torch.roll(level, shifts=shift, dims=2)).mean() ** 2
            loss = loss + (level * torch.roll(level, shifts=shift, dims=3)).mean() ** 2
            if level.shape[2] <= 8:
                break
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def kl_divergence(noise: torch.Tensor) -> torch.Tensor:
    """The authors' `kl_divergence`: `var + mean² - 1 - log(var + 1e-7)` of all of `noise`."""
    mean, variance = noise.mean(), noise.var()
    return variance + mean**2 - 1 - torch.log(variance + 1e-7)


def regularized_noise(
    eps: torch.Tensor, rng: random.Random, lambda_ac: float, lambda_kl: float, num_reg_steps: int, num_ac_rolls: int
) -> torch.Tensor:
    """One image's `[C, h, w]` noise prediction after the authors' regularisation rounds.

    Args:
        eps (`torch.Tensor`): the prediction.
        rng (`random.Random`): the shifts' generator.
        lambda_ac (`float`): the auto-correlation loss's step (divided by `num_ac_rolls`).
        lambda_kl (`float`): the KL divergence's step.
        num_reg_steps (`int`): rounds.
        num_ac_rolls (`int`): auto-correlation steps per round.
    """
    # The inversion runs under no_grad (and Lightning's inference mode): each gradient is taken on
    # a fresh leaf outside both.
    with torch.inference_mode(False), torch.enable_grad():
        eps = eps.detach().clone()
        for _ in range(num_reg_steps):
            if lambda_ac > 0:
                for _ in range(num_ac_rolls):
                    leaf = eps.detach().clone().requires_grad_(True)
                    (gradient,) = torch.autograd.grad(auto_correlation_loss(leaf, rng), leaf)
                    eps = eps - lambda_ac * (gradient / num_ac_rolls)
            if lambda_kl > 0:
                leaf = eps.detach().clone().requires_grad_(True)
                (gradient,) = torch.autograd.grad(kl_divergence(leaf), leaf)
                eps = eps - lambda_kl * gradient
            eps = eps.detach()
    return eps


class Pix2PixZeroInversion(InversionMethod):
    name = "pix2pix_zero"
    label = "Pix2Pix-Zero's DDIM inversion"
    stores_pivot = True
    DEFAULTS = {"lambda_ac": 20.0, "lambda_kl": 20.0, "num_reg_steps": 5, "num_ac_rolls": 5, "seed": 0}

    def check(self, option: str) -> None:
        for key in ("lambda_ac", "lambda_kl"):
            if not is_number(self.options[key]) or self.options[key] < 0:
                raise OptionError(f"{option}.{key} must be a number >= 0, got {self.options[key]!r}")
        for key in ("num_reg_steps", "num_ac_rolls", "seed"):
            if not is_count(self.options[key]):
                raise OptionError(f"{option}.{key} must be a whole number >= 0, got {self.options[key]!r}")
        if self.options["num_ac_rolls"] == 0 and self.options["lambda_ac"] > 0:
            raise OptionError(f"{option}.num_ac_rolls must be at least 1 while lambda_ac is above 0")

    @property
    def walks(self) -> bool:
        return False

    @torch.no_grad()
    def walk_pivot(
        self,
        unet: UNet2DConditionModel,
        schedule: DDIMSchedule,
        z0: torch.Tensor,
        cond: Condition,
        empty: Optional[Condition],
        ids: Sequence[str],
    ) -> Optional[PivotTrajectory]:
        o = self.options
        if min(z0.shape[-2:]) < 2:
            raise ValueError(f"Pix2Pix-Zero's regularisation needs latents of at least 2x2, got {tuple(z0.shape[-2:])}")
        rngs = [random.Random(image_seed(o["seed"], id_)) for id_ in ids]
        alphas, last = schedule.alphas_cumprod, schedule.alphas_cumprod.shape[0]
        latent = z0.float()
        latents = [latent]
        for timestep in schedule.timesteps.flip(0).tolist():
            alpha_from = alphas[timestep - 1]  # their ā[t - 1] (ā[-1] at t = 0, as their indexing)
            to = timestep + schedule.step_ratio
            alpha_to = alphas[to - 1] if to <= last else alphas[-1]
            eps = to_epsilon(predict(unet, latent, timestep, cond), latent, schedule.alpha(timestep),
                             schedule.prediction_type)
            eps = torch.stack([
                regularized_noise(eps[b], rngs[b], float(o["lambda_ac"]), float(o["lambda_kl"]), o["num_reg_steps"],
                                  o["num_ac_rolls"])
                for b in range(eps.shape[0])
            ])
            latent = _ddim_move(eps, latent, alpha_from, alpha_to)
            latents.append(latent)
        return PivotTrajectory(latents=torch.stack(latents), timesteps=schedule.timesteps.clone())
