"""Step 2 of Null-text Inversion: the per-timestep objective and its bookkeeping.

For each timestep of the walk from T to 1, a fresh Adam tunes the unconditional ("null") text
embedding (for SDXL the pair of token and pooled embeddings, by one Adam) so that one guided
DDIM step from the current latent `z̄` lands on the pivot's next latent. This module is the
maths of one such timestep for a batch of images, written so that a batch gives every image exactly what it gets alone:

* the loss is the *sum* of per-image MSEs, so each image's gradient is its own MSE's gradient;
* each image stops on its own (`loss < ε + i·2e-5`, measured before the update, as the
  reference does); a stopped image's embedding is held fixed while the others go on.

The inner loop itself is driven by `nti_lightning.training.NullTextInversion` (one inner
iteration per training batch, one timestep per epoch); `tests/reference.py` is the plain
loop of docs/ALGORITHM.md it is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.guidance import predict
from nti_lightning.inversion.step import step_losses

#: Per-step growth of the early-stop threshold in the reference (`ε + i * 2e-5`).
THRESHOLD_SLOPE = 2e-5


def step_learning_rate(step: int, learning_rate: float = 1e-2) -> float:
    """The reference's learning rate at step `step` of the walk: `lr · (1 - step/100)`."""
    return learning_rate * (1.0 - step / 100.0)


def early_stop_threshold(step: int, epsilon: float = 1e-5) -> float:
    """An image stops at step `step` once its loss is below `epsilon + step · 2e-5`."""
    return epsilon + step * THRESHOLD_SLOPE


@dataclass
class TimestepProblem:
    """The null-text problem at one timestep of the walk, for a batch of B images.

    Args:
        step (`int`): index i in the walk (0 is the noisiest timestep).
        timestep (`int`): the DDIM timestep `timesteps[i]`.
        latent (`torch.Tensor`): `[B, C, h, w]` current latent `z̄`, fp32.
        target (`torch.Tensor`): `[B, C, h, w]` pivot latent `z[T-1-i]`, fp32.
        cond_output (`torch.Tensor`): `[B, C, h, w]` UNet output for the source prompt at `z̄`,
            fp32, computed once per step.
        threshold (`float`): the early-stop threshold of this step.
        active (`torch.Tensor`): `[B]` bool, images still optimising.
        iterations (`torch.Tensor`): `[B]` int64, inner iterations used so far.
        loss (`torch.Tensor`): `[B]` fp32, each image's last loss.
    """

    step: int
    timestep: int
    latent: torch.Tensor
    target: torch.Tensor
    cond_output: torch.Tensor
    threshold: float
    active: torch.Tensor
    iterations: torch.Tensor
    loss: torch.Tensor

    @classmethod
    @torch.no_grad()
    def start(
        cls,
        unet: UNet2DConditionModel,
        step: int,
        timestep: int,
        latent: torch.Tensor,
        target: torch.Tensor,
        cond: Condition,
        epsilon: float,
        active: torch.Tensor | None = None,
    ) -> "TimestepProblem":
        """Sets up step `step`: evaluates the conditional branch once (no grad).

        `active` (`[B]` bool, default all) marks the images to optimise; the others (empty slots,
        methods without optimisation) keep their embedding and count no iteration.
        """
        batch = latent.shape[0]
        if active is None:
            active = torch.ones(batch, dtype=torch.bool, device=latent.device)
        return cls(
            step=step,
            timestep=timestep,
            latent=latent,
            target=target.float(),
            cond_output=predict(unet, latent, timestep, cond),
            threshold=early_stop_threshold(step, epsilon),
            active=active.to(latent.device).clone(),
            iterations=torch.zeros(batch, dtype=torch.long, device=latent.device),
            loss=torch.full((batch,), float("nan"), device=latent.device),
        )

    def losses(
        self,
        schedule: DDIMSchedule,
        unet: UNet2DConditionModel,
        null: Condition,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Per-image MSE between the guided step with the null condition `null` and the pivot target, `[B]` fp32."""
        return step_losses(
            schedule, unet, self.latent, self.timestep, null, self.cond_output, self.target, guidance_scale
        )

    @torch.no_grad()
    def record(self, losses: torch.Tensor) -> torch.Tensor:
        """Books one inner iteration; returns the mask of images the update applied to.

        Call after the optimizer step with the losses computed before it: images whose loss was
        below the threshold stop now (their update still counts, as in the reference).
        """
        updated = self.active.clone()
        self.iterations += updated.long()
        self.loss = torch.where(updated, losses.detach().float(), self.loss)
        self.active &= ~(losses.detach() < self.threshold)
        return updated


def objective(losses: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Sum of the active images' losses: each image's gradient is that of its own MSE."""
    return (losses * active.to(losses.dtype)).sum()


@torch.no_grad()
def keep_inactive(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor], updated: torch.Tensor) -> None:
    """Undoes an optimizer step on the images that were not being optimised.

    Adam moves a parameter even where its gradient is zero (momentum), so a stopped image's
    embeddings (token and, for SDXL, pooled) are restored from `before`.
    """
    for param, old in zip(params, before):
        mask = updated.view(-1, *([1] * (param.dim() - 1)))
        param.copy_(torch.where(mask, param, old))
