"""Step 3 of Null-text Inversion: sampling from `z_T` with a null embedding per step.

The same loop reconstructs an image (source prompt), edits it (other prompts), and gives the
baselines: plain DDIM (the `""` embedding at every step) and negative-prompt inversion (the
prompt embedding itself as the unconditional input).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.guidance import guided_step

#: Called after every step with (step index, timestep, new latents); may return replacement latents.
StepCallback = Callable[[int, int, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    schedule: DDIMSchedule,
    z_T: torch.Tensor,
    nulls: Sequence[Condition],
    cond: Condition,
    guidance_scale: float = 7.5,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Guided DDIM sampling from `z_T`, with `nulls[i]` as the unconditional input of step i.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        schedule (`DDIMSchedule`): the schedule the inversion used (same T).
        z_T (`torch.Tensor`): `[B, C, h, w]` starting latents (or `[1, C, h, w]`, broadcast).
        nulls (`Sequence[Condition]`): T per-step unconditional conditions of B rows, or of one
            row (broadcast to every prompt of the batch).
        cond (`Condition`): the B prompt conditions.
        guidance_scale (`float`, defaults to 7.5): w.
        on_step (`StepCallback`, *optional*): hook after each step (Prompt-to-Prompt's LocalBlend).

    Returns:
        `[B, C, h, w]` fp32 latents at t = 0.
    """
    if len(nulls) != schedule.num_inference_steps:
        raise ValueError(f"{len(nulls)} null conditions for {schedule.num_inference_steps} sampling steps")
    latents = z_T.float().expand(cond.batch, -1, -1, -1)
    for step, timestep in enumerate(schedule.timesteps.tolist()):
        uncond = nulls[step].to(dtype=cond.embeddings.dtype)
        latents = guided_step(schedule, unet, latents, timestep, uncond, cond, guidance_scale)
        if on_step is not None:
            replaced = on_step(step, timestep, latents)
            latents = latents if replaced is None else replaced
    return latents
