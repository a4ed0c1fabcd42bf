"""UNet calls and classifier-free guidance, with fp32 outputs whatever the UNet runs in.

The frozen UNet may run in fp32, in half precision, or under autocast; everything downstream of
it (guidance, DDIM arithmetic, the null-text loss) stays in fp32, so the outputs are cast up here.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule, Timestep, prev_step


def predict(
    unet: UNet2DConditionModel, latents: torch.Tensor, timestep: Timestep, condition: Condition
) -> torch.Tensor:
    """The UNet's output for `latents` at `timestep` under `condition`, as fp32.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        latents (`torch.Tensor`): `[B, C, h, w]` latents.
        timestep (`int` or `torch.Tensor`): one timestep shared by the whole batch, or a `[B]`
            tensor of one per row (diffusers' UNet embeds each row's own timestep).
        condition (`Condition`): a batch of B conditions (differentiable if needed).
    """
    dtype = unet.dtype
    if isinstance(timestep, torch.Tensor):
        timestep = timestep.to(latents.device)
    output = unet(latents.to(dtype), timestep, **condition.unet_kwargs(dtype)).sample
    return output.float()


def guide(uncond_output: torch.Tensor, cond_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance `u + w (c - u)` on model outputs (linear, so valid for ε and v)."""
    return uncond_output + guidance_scale * (cond_output - uncond_output)


@torch.no_grad()
def guided_step(
    schedule: DDIMSchedule,
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: Timestep,
    uncond: Condition,
    cond: Condition,
    guidance_scale: float | torch.Tensor,
    cond_output: torch.Tensor | None = None,
    eta: float = 0.0,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One guided DDIM denoising step t -> t-Δ (or, with `eta`, the stochastic step's mean).

    Args:
        schedule (`DDIMSchedule`): noise levels and prediction type.
        unet (`UNet2DConditionModel`): the denoiser.
        latents (`torch.Tensor`): `[B, C, h, w]` latents at `timestep`.
        timestep (`int` or `torch.Tensor`): the current timestep, or a `[B]` tensor of one per row.
        uncond (`Condition`): B (or 1, broadcast) unconditional conditions.
        cond (`Condition`): B prompt conditions.
        guidance_scale (`float` or `torch.Tensor`): w, or a `[B, 1, 1, 1]` w per row.
        cond_output (`torch.Tensor`, *optional*): the conditional output, if already computed for
            these latents at this timestep; saves one UNet call.
        eta (`float`, defaults to 0.0): 0, the DDIM step; above, the deterministic part of the
            stochastic step (`prev_step`), without its noise term.
        combine (`Callable`, *optional*): (unconditional, conditional output) -> the guided output,
            in place of classifier-free guidance at `guidance_scale` (ProxNPI's thresholding).
    """
    uncond = uncond.expand(latents.shape[0])
    if cond_output is None:
        # One UNet call for both branches, as every Stable Diffusion sampler does.
        per_row = isinstance(timestep, torch.Tensor) and timestep.dim() > 0
        both_timesteps = torch.cat([timestep, timestep]) if per_row else timestep
        both = predict(unet, torch.cat([latents, latents]), both_timesteps, Condition.cat([uncond, cond]))
        uncond_output, cond_output = both.chunk(2)
    else:
        uncond_output = predict(unet, latents, timestep, uncond)
    if combine is not None:
        guided = combine(uncond_output, cond_output)
    else:
        guided = guide(uncond_output, cond_output, guidance_scale)
    return prev_step(schedule, guided, timestep, latents.float(), eta)
