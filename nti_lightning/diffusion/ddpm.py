"""Independently noised trajectories, for edit-friendly DDPM inversion (Huberman-Spiegelglas et
al., CVPR 2024): each x_t drawn from z0 on its own, the noise of each image from its own seeded
generator. The method's step is `nti_lightning.diffusion.ddim.prev_step` with `eta` (the
deterministic part of the authors' stochastic step); the noise term `η σ_t z_t` it stores is the
offset from that step's result to the next latent.
"""

from __future__ import annotations

from typing import Sequence

import torch

from nti_lightning.diffusion.ddim import DDIMSchedule


def noised_trajectory(
    schedule: DDIMSchedule, z0: torch.Tensor, noises: Sequence[torch.Tensor]
) -> torch.Tensor:
    """`[T + 1, B, C, h, w]` latents, `[0]` = `z0` and `[k]` = `sqrt(ā) z0 + sqrt(1 - ā) n_k` at the
    k-th timestep in ascending order, each drawn independently (the authors' `sample_xts_from_x0`).

    Args:
        schedule (`DDIMSchedule`): noise levels; its timesteps are taken in ascending order.
        z0 (`torch.Tensor`): `[B, C, h, w]` clean latents.
        noises (`Sequence[torch.Tensor]`): T tensors like `z0`, the noise of each timestep, ascending.
    """
    if len(noises) != schedule.num_inference_steps:
        raise ValueError(f"{len(noises)} noise tensors for {schedule.num_inference_steps} timesteps")
    latents = [z0.float()]
    for timestep, noise in zip(schedule.timesteps.flip(0).tolist(), noises):
        alpha = schedule.alpha(timestep).to(z0.device)
        latents.append(z0.float() * alpha**0.5 + noise.to(z0.device, torch.float32) * (1 - alpha) ** 0.5)
    return torch.stack(latents)


def image_noises(shape: Sequence[int], count: int, seed: int) -> list[torch.Tensor]:
    """`count` standard-normal tensors of `shape` for one image, drawn in order from a CPU generator
    seeded with `seed`: the same numbers on every device and in any batch.

    Args:
        shape (`Sequence[int]`): one tensor's shape, e.g. `[C, h, w]`.
        count (`int`): how many (T).
        seed (`int`): the generator's seed.
    """
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=generator) for _ in range(count)]
