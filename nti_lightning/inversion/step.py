"""The per-image step of every inversion method, shared by both schedules.

Lockstep (`nti_lightning.inversion.trajectory`: a batch walks its timesteps together) and
continuous scheduling (`nti_lightning.inversion.slots`: each slot at its own timestep) call these
with their own rows; an image's numbers are the same whichever schedule carries it:

* `step_losses`: Null-text's objective, the MSE between the guided step with the null condition
  and the pivot's next latent, per image;
* `advance`: the frozen null condition's guided DDIM step, then the method's `after_step` (from
  where it landed, or back on the pivot with the offset stored);
* `finished_inversion`: one image's per-step results packed as an `Inversion`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule, Timestep, prev_step
from nti_lightning.diffusion.guidance import guide, guided_step, predict
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods import InversionMethod


def step_losses(
    schedule: DDIMSchedule,
    unet: UNet2DConditionModel,
    latent: torch.Tensor,
    timestep: Timestep,
    null: Condition,
    cond_output: torch.Tensor,
    target: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Per-image MSE between the guided step with the null condition `null` and the pivot target, `[B]` fp32.

    Args:
        schedule (`DDIMSchedule`): noise levels and prediction type.
        unet (`UNet2DConditionModel`): the denoiser.
        latent (`torch.Tensor`): `[B, C, h, w]` current latents z̄.
        timestep (`int` or `torch.Tensor`): the step's timestep, or a `[B]` tensor of one per row.
        null (`Condition`): B null conditions (differentiable: the tuned parameters).
        cond_output (`torch.Tensor`): `[B, C, h, w]` the source prompt's UNet output at `latent`, fp32.
        target (`torch.Tensor`): `[B, C, h, w]` the pivot latents the step must land on.
        guidance_scale (`float`): w.
    """
    uncond_output = predict(unet, latent, timestep, null)
    # The guidance and DDIM arithmetic run in fp32 even inside an autocast region.
    with torch.autocast(device_type=latent.device.type, enabled=False):
        guided = guide(uncond_output.float(), cond_output, guidance_scale)
        predicted = prev_step(schedule, guided, timestep, latent)
        return F.mse_loss(predicted, target, reduction="none").flatten(1).mean(1)


@torch.no_grad()
def advance(
    method: InversionMethod,
    schedule: DDIMSchedule,
    unet: UNet2DConditionModel,
    latent: torch.Tensor,
    timestep: Timestep,
    frozen: Condition,
    cond: Condition,
    target: torch.Tensor,
    guidance_scale: float,
    cond_output: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The guided DDIM step of latents `latent` with the frozen null condition (the method's w and
    step: `walk_guidance_scale`, `eta`), then the method's `after_step`; returns the latents the
    walk goes on from and the offsets to store (or `None`).

    Args:
        method (`InversionMethod`): the inversion method.
        schedule, unet, latent, timestep: as `step_losses`.
        frozen (`Condition`): the step's frozen null conditions, fp32.
        cond (`Condition`): the source-prompt conditions.
        target (`torch.Tensor`): `[B, C, h, w]` the step's pivot latents.
        guidance_scale (`float`): w.
        cond_output (`torch.Tensor`, *optional*): the conditional output already computed at
            `latent`: the step then reuses it (one UNet row less, other float rounding). By
            default both branches run in one UNet call, as the reference does.
    """
    if not method.walks:  # the method's own trajectory, made whole beforehand (EDICT)
        return method.after_step(target, target)
    stepped = guided_step(
        schedule, unet, latent, timestep, frozen, cond, method.walk_guidance_scale(guidance_scale),
        cond_output=cond_output, eta=method.eta,
    )
    return method.after_step(stepped, target)


def finished_inversion(
    z_T: torch.Tensor,
    z0: torch.Tensor,
    prompt: str,
    image_id: str,
    metadata: dict[str, Any],
    null_embeddings: torch.Tensor,
    null_pooled_embeddings: Optional[torch.Tensor],
    iterations: Sequence[int],
    losses: Sequence[float],
    offsets: Optional[torch.Tensor],
    pivot_latents: Optional[torch.Tensor] = None,
    pair: Optional[torch.Tensor] = None,
) -> Inversion:
    """One image's walk as an `Inversion` (tensors moved to the CPU).

    Args:
        z_T (`torch.Tensor`): `[C, h, w]` the pivot's end.
        z0 (`torch.Tensor`): `[C, h, w]` the image's VAE latent.
        prompt (`str`): the source prompt.
        image_id (`str`): the image id.
        metadata (`dict`): the run's metadata (model, method, settings...).
        null_embeddings (`torch.Tensor`): `[T, 77, D]` the frozen null embedding of each step.
        null_pooled_embeddings (`torch.Tensor`, *optional*): `[T, P]` SDXL's pooled ones.
        iterations (`Sequence[int]`): inner iterations used at each step.
        losses (`Sequence[float]`): the last loss of each step.
        offsets (`torch.Tensor`, *optional*): `[T, C, h, w]` the method's stored offsets.
        pivot_latents (`torch.Tensor`, *optional*): `[T + 1, C, h, w]` the pivot (`z0` first), for a
            method that stores it (`InversionMethod.stores_pivot`): kept as the latent each step
            lands on, `[T, C, h, w]`.
        pair (`torch.Tensor`, *optional*): `[2, C, h, w]` float64, EDICT's coupled latents.
    """
    return Inversion(
        z_T=z_T.cpu().clone(),
        null_embeddings=null_embeddings.cpu().clone(),
        source_latent=z0.cpu().clone(),
        prompt=prompt,
        metadata={**metadata, "id": image_id, "inner_iterations": list(iterations), "final_losses": list(losses)},
        null_pooled_embeddings=None if null_pooled_embeddings is None else null_pooled_embeddings.cpu().clone(),
        latent_offsets=None if offsets is None else offsets.cpu().clone(),
        pivot_latents=None if pivot_latents is None else pivot_latents[:-1].flip(0).cpu().clone(),
        coupled_latents=None if pair is None else pair.cpu().clone(),
    )
