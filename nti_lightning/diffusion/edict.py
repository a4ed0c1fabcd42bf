"""EDICT's coupled steps (Wallace et al., CVPR 2023; salesforce/EDICT `edict_functions.py`).

Two latent sequences x and y walk together. A denoising step at timestep t updates one with the
noise predicted on the other, then the other with the noise predicted on the first's new value
(which goes first alternates from step to step), and then mixes them:

    x ← p x + (1 - p) y,    y ← (1 - p) x + p y        (x already the mixed one)

Each update is an affine map of the latent it changes, so the whole step can be undone exactly:
inversion undoes the mixing (y, then x) and then the two updates in the reverse order. The pair
is held in float64, as the authors hold it: in float32 the inverse's rounding is amplified by
orders of magnitude. The UNet runs in its own dtype; its outputs are widened to float64.

`coupled_step` is one step in either direction; `eps` is the (guided) noise prediction of a
latent at the step's timestep, whatever computes it.
"""

from __future__ import annotations

from typing import Callable

import torch

from nti_lightning.diffusion.ddim import DDIMSchedule

#: The noise predicted for a float64 latent at a timestep: `[B, C, h, w]` float64.
NoisePrediction = Callable[[torch.Tensor], torch.Tensor]


def _levels(schedule: DDIMSchedule, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ā_t, ā_prev)` in float64 (`final_alpha_cumprod` below timestep 0)."""
    alpha_t = schedule.alpha(timestep).double()
    alpha_prev = schedule.alpha(timestep - schedule.step_ratio).double()
    return alpha_t, alpha_prev


def denoise(schedule: DDIMSchedule, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
    """The authors' `forward_step`: a DDIM step t -> t-Δ written as an affine map of `sample`."""
    alpha_t, alpha_prev = _levels(schedule, timestep)
    alpha_quotient = (alpha_t / alpha_prev) ** 0.5
    first = (1.0 / alpha_quotient) * sample
    second = (1.0 / alpha_quotient) * ((1 - alpha_t) ** 0.5) * eps
    third = ((1 - alpha_prev) ** 0.5) * eps
    return first - second + third


def renoise(schedule: DDIMSchedule, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
    """The authors' `reverse_step`: `denoise` undone, t-Δ -> t, with the same `eps`."""
    alpha_t, alpha_prev = _levels(schedule, timestep)
    alpha_quotient = (alpha_t / alpha_prev) ** 0.5
    first = alpha_quotient * sample
    second = ((1 - alpha_t) ** 0.5) * eps
    third = alpha_quotient * ((1 - alpha_prev) ** 0.5) * eps
    return first + second - third


def coupled_step(
    schedule: DDIMSchedule,
    pair: tuple[torch.Tensor, torch.Tensor],
    timestep: int,
    first: int,
    eps: Callable[[torch.Tensor, int], torch.Tensor],
    mix_weight: float,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDICT step of the float64 `pair` (x, y) at `timestep`.

    Args:
        schedule (`DDIMSchedule`): noise levels (timesteps t and t-Δ).
        pair (`tuple[torch.Tensor, torch.Tensor]`): `[B, C, h, w]` float64 x and y.
        timestep (`int`): t.
        first (`int`): which latent the denoising step updates first (0: x), the step's parity.
        eps (`Callable[[torch.Tensor, int], torch.Tensor]`): the guided noise prediction of a
            float64 latent at a timestep, as float64.
        mix_weight (`float`): p.
        reverse (`bool`): False denoises (t -> t-Δ), True undoes that (t-Δ -> t).
    """
    latents = [pair[0], pair[1]]
    p = mix_weight
    if reverse:  # undo the mixing: y first (it was mixed last), then x
        latents[1] = (latents[1] - (1 - p) * latents[0]) / p
        latents[0] = (latents[0] - (1 - p) * latents[1]) / p
        order = (1 - first, first)  # the updates undone last to first
        for index in order:
            latents[index] = renoise(schedule, eps(latents[1 - index], timestep), timestep, latents[index])
        return latents[0], latents[1]
    for index in (first, 1 - first):
        latents[index] = denoise(schedule, eps(latents[1 - index], timestep), timestep, latents[index])
    x = p * latents[0] + (1 - p) * latents[1]
    y = (1 - p) * x + p * latents[1]
    return x, y
