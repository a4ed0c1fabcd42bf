"""Step 3 of Null-text Inversion: sampling from `z_T` with a null embedding per step.

The same loop reconstructs an image (source prompt), edits it (other prompts), and gives the
baselines: plain DDIM (the `""` embedding at every step) and negative-prompt inversion (the
prompt embedding itself as the unconditional input).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.guidance import guided_step

#: Called after every step with (step index, timestep, new latents); may return replacement latents.
StepCallback = Callable[[int, int, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    schedule: DDIMSchedule,
    z_T: torch.Tensor,
    null_embeddings: torch.Tensor,
    cond_embeddings: torch.Tensor,
    guidance_scale: float = 7.5,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Guided DDIM sampling from `z_T`, with `null_embeddings[i]` as the unconditional input of step i.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        schedule (`DDIMSchedule`): the schedule the inversion used (same T).
        z_T (`torch.Tensor`): `[B, C, h, w]` starting latents (or `[1, C, h, w]`, broadcast).
        null_embeddings (`torch.Tensor`): `[T, B, 77, D]` or `[T, 1, 77, D]` per-step unconditional
            embeddings (broadcast to every prompt of the batch).
        cond_embeddings (`torch.Tensor`): `[B, 77, D]` prompt embeddings.
        guidance_scale (`float`, defaults to 7.5): w.
        on_step (`StepCallback`, *optional*): hook after each step (Prompt-to-Prompt's LocalBlend).

    Returns:
        `[B, C, h, w]` fp32 latents at t = 0.
    """
    if null_embeddings.shape[0] != schedule.num_inference_steps:
        raise ValueError(
            f"{null_embeddings.shape[0]} null embeddings for {schedule.num_inference_steps} sampling steps"
        )
    batch = cond_embeddings.shape[0]
    latents = z_T.float().expand(batch, -1, -1, -1)
    for step, timestep in enumerate(schedule.timesteps.tolist()):
        uncond = null_embeddings[step].to(cond_embeddings.dtype).expand(batch, -1, -1)
        latents = guided_step(schedule, unet, latents, timestep, uncond, cond_embeddings, guidance_scale)
        if on_step is not None:
            replaced = on_step(step, timestep, latents)
            latents = latents if replaced is None else replaced
    return latents
