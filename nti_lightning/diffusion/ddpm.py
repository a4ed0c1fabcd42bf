"""Stochastic DDIM steps (eta > 0, DDPM at eta = 1) and independently noised trajectories, for
edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024).

An eta step splits the DDIM update into a deterministic mean and a noise term, as the authors'
`reverse_step` writes it (inbarhub/DDPM_inversion `ddm_inversion/inversion_utils.py`):

    x_{t-Δ} = sqrt(ā_prev) x̂0 + sqrt(1 - ā_prev - η σ²_t) ε  +  η σ_t z

with `σ²_t = (1 - ā_prev) / (1 - ā_t) · (1 - ā_t / ā_prev)` (diffusers' `DDIMScheduler._get_variance`).
`mean_step` is the first part; the noise term is what an edit-friendly inversion stores per step
(`η σ_t z_t`, the offset from the mean to the next latent). DDIM's own eta step has `η² σ²` under
the square root; the two agree at η = 1, the value the method runs with.
"""

from __future__ import annotations

from typing import Sequence

import torch

from nti_lightning.diffusion.ddim import DDIMSchedule, Timestep, to_epsilon


def variance(schedule: DDIMSchedule, timestep: Timestep) -> torch.Tensor:
    """`σ²_t = (1 - ā_prev) / (1 - ā_t) · (1 - ā_t / ā_prev)` of the step from `timestep` (fp32).

    Args:
        schedule (`DDIMSchedule`): noise levels.
        timestep (`int` or `torch.Tensor`): the step's timestep t (or one per row, `[B]`).
    """
    alpha_t = schedule.alpha(timestep)
    alpha_prev = schedule.alpha(timestep - schedule.step_ratio)
    return (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)


def mean_step(
    schedule: DDIMSchedule, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, eta: float
) -> torch.Tensor:
    """The deterministic part of an eta step t -> t-Δ (at eta = 0 exactly DDIM's `prev_step`).

    Args:
        schedule (`DDIMSchedule`): noise levels and prediction type.
        model_output (`torch.Tensor`): the (guided) model output at `timestep` for `sample`.
        timestep (`int` or `torch.Tensor`): the current timestep t (or one per row, `[B]`).
        sample (`torch.Tensor`): the latent at t.
        eta (`float`): η, the weight of the step's variance (1: DDPM).
    """
    alpha_t = schedule.alpha(timestep).to(sample.device)
    alpha_prev = schedule.alpha(timestep - schedule.step_ratio).to(sample.device)
    eps = to_epsilon(model_output, sample, alpha_t, schedule.prediction_type)
    # The authors' operation order (their `reverse_step`).
    pred_original = (sample - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    direction = (1 - alpha_prev - eta * variance(schedule, timestep).to(sample.device)) ** 0.5 * eps
    return alpha_prev**0.5 * pred_original + direction


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
