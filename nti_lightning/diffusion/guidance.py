"""UNet calls and classifier-free guidance, with fp32 outputs whatever the UNet runs in.

The frozen UNet may run in fp32, in half precision, or under autocast; everything downstream of
it (guidance, DDIM arithmetic, the null-text loss) stays in fp32, so the outputs are cast up here.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.ddim import DDIMSchedule, prev_step


def predict(
    unet: UNet2DConditionModel, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor
) -> torch.Tensor:
    """The UNet's output for `latents` at `timestep` conditioned on `embeddings`, as fp32.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        latents (`torch.Tensor`): `[B, C, h, w]` latents.
        timestep (`int`): one timestep shared by the whole batch.
        embeddings (`torch.Tensor`): `[B, 77, D]` text embeddings (differentiable if needed).
    """
    dtype = unet.dtype
    output = unet(latents.to(dtype), timestep, encoder_hidden_states=embeddings.to(dtype)).sample
    return output.float()


def guide(uncond_output: torch.Tensor, cond_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance `u + w (c - u)` on model outputs (linear, so valid for ε and v)."""
    return uncond_output + guidance_scale * (cond_output - uncond_output)


@torch.no_grad()
def guided_step(
    schedule: DDIMSchedule,
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: int,
    uncond_embeddings: torch.Tensor,
    cond_embeddings: torch.Tensor,
    guidance_scale: float,
    cond_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """One guided DDIM denoising step t -> t-Δ.

    Args:
        schedule (`DDIMSchedule`): noise levels and prediction type.
        unet (`UNet2DConditionModel`): the denoiser.
        latents (`torch.Tensor`): `[B, C, h, w]` latents at `timestep`.
        timestep (`int`): the current timestep.
        uncond_embeddings (`torch.Tensor`): `[B, 77, D]` (or `[1, 77, D]`) unconditional embeddings.
        cond_embeddings (`torch.Tensor`): `[B, 77, D]` prompt embeddings.
        guidance_scale (`float`): w.
        cond_output (`torch.Tensor`, *optional*): the conditional output, if already computed for
            these latents at this timestep; saves one UNet call.
    """
    batch = latents.shape[0]
    uncond_embeddings = uncond_embeddings.expand(batch, -1, -1)
    if cond_output is None:
        # One UNet call for both branches, as every Stable Diffusion sampler does.
        both = predict(unet, torch.cat([latents, latents]), timestep, torch.cat([uncond_embeddings, cond_embeddings]))
        uncond_output, cond_output = both.chunk(2)
    else:
        uncond_output = predict(unet, latents, timestep, uncond_embeddings)
    return prev_step(schedule, guide(uncond_output, cond_output, guidance_scale), timestep, latents.float())
