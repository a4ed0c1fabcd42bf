"""Deterministic DDIM steps (eta = 0) in both directions, for epsilon and v-prediction models.

`DDIMSchedule` is the small piece of a diffusers scheduler the algorithm needs: the cumulative
alphas, the descending inference timesteps and the prediction type. The steps are written out
rather than delegated to `DDIMScheduler.step` because inversion needs the *next* step too, the
null-text objective needs them differentiable in fp32, and a batch may sit at one timestep.

Notation follows docs/ALGORITHM.md: `ā[t] = alphas_cumprod[t]`, `Δ = num_train_timesteps // T`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch
from diffusers import DDIMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")

#: One timestep for a whole batch, or a `[B]` tensor of one timestep per row.
Timestep = Union[int, torch.Tensor]


@dataclass(frozen=True)
class DDIMSchedule:
    """The DDIM timesteps and noise levels of one inference run.

    Args:
        alphas_cumprod (`torch.Tensor`): `ā` for every training timestep, fp32, on CPU or device.
        final_alpha_cumprod (`float`): `ā` used past timestep 0 (`ā[0]` with `set_alpha_to_one=False`).
        timesteps (`torch.Tensor`): the inference timesteps, descending (e.g. 981, 961, ..., 1).
        step_ratio (`int`): `Δ = num_train_timesteps // num_inference_steps`.
        prediction_type (`str`): "epsilon" or "v_prediction".
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    timesteps: torch.Tensor
    step_ratio: int
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], num_inference_steps: int) -> "DDIMSchedule":
        """Builds the schedule the reference uses from any Stable Diffusion scheduler config.

        The config's own betas and `steps_offset` are kept; `clip_sample` and `set_alpha_to_one`
        are forced off as in the reference notebook.

        Args:
            config (`Mapping`): a diffusers scheduler config (`pipeline.scheduler.config`).
            num_inference_steps (`int`): T, the number of DDIM steps.
        """
        scheduler = ddim_scheduler(config)
        scheduler.set_timesteps(num_inference_steps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}"
            )
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            timesteps=scheduler.timesteps.clone(),
            step_ratio=scheduler.config.num_train_timesteps // num_inference_steps,
            prediction_type=prediction_type,
        )

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, timestep: Timestep) -> torch.Tensor:
        """`ā[timestep]` as a 0-d fp32 tensor, or `ā_final` for a negative timestep (one step past 0).

        fp32 scalars, not Python floats, so that every coefficient is rounded exactly as in
        diffusers' `DDIMScheduler.step`. For a `[B]` tensor of timesteps (each row of a batch at
        its own timestep) the levels come as `[B, 1, 1, 1]`, row for row the same values, and
        the steps below broadcast them: elementwise fp32 arithmetic, so each row is computed
        exactly as it would be alone.
        """
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 0:
            steps = timestep.detach().to("cpu", torch.long)
            final = torch.tensor(self.final_alpha_cumprod, dtype=torch.float32)
            levels = torch.where(steps >= 0, self.alphas_cumprod.cpu()[steps.clamp_min(0)], final)
            return levels.view(-1, 1, 1, 1)
        timestep = int(timestep)
        if timestep >= 0:
            return self.alphas_cumprod[timestep]
        return torch.tensor(self.final_alpha_cumprod, dtype=torch.float32)


def ddim_scheduler(config: Mapping[str, Any]) -> DDIMScheduler:
    """`DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)`."""
    return DDIMScheduler.from_config(dict(config), clip_sample=False, set_alpha_to_one=False)


def to_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Converts a model output at noise level `alpha_t` into a noise estimate.

    For v-prediction `ε = sqrt(ā_t) v + sqrt(1-ā_t) x`, where `x` is the latent the model saw and
    `ā_t` the level of the timestep it was called with.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t**0.5 * model_output + (1 - alpha_t) ** 0.5 * sample
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _ddim_move(
    eps: torch.Tensor,
    sample: torch.Tensor,
    alpha_from: torch.Tensor,
    alpha_to: torch.Tensor,
    variance: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """`sqrt(ā_to) x̂0 + sqrt(1 - ā_to - variance) ε` with `x̂0 = (x - sqrt(1-ā_from) ε) / sqrt(ā_from)`.

    Written in the operation order of `DDIMScheduler.step`, so the two agree bit for bit (the
    default zero variance subtracts exactly nothing).
    """
    alpha_from, alpha_to = alpha_from.to(sample.device), alpha_to.to(sample.device)
    if isinstance(variance, torch.Tensor):
        variance = variance.to(sample.device)
    beta_from = 1 - alpha_from
    pred_original = (sample - beta_from ** (0.5) * eps) / alpha_from ** (0.5)
    direction = (1 - alpha_to - variance) ** (0.5) * eps
    return alpha_to ** (0.5) * pred_original + direction


def step_variance(schedule: DDIMSchedule, timestep: Timestep) -> torch.Tensor:
    """`σ²_t = (1 - ā_prev) / (1 - ā_t) · (1 - ā_t / ā_prev)` of the step from `timestep` (fp32;
    diffusers' `DDIMScheduler._get_variance`).

    Args:
        schedule (`DDIMSchedule`): noise levels.
        timestep (`int` or `torch.Tensor`): the step's timestep t (or one per row, `[B]`).
    """
    alpha_t = schedule.alpha(timestep)
    alpha_prev = schedule.alpha(timestep - schedule.step_ratio)
    return (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)


def prev_step(
    schedule: DDIMSchedule, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, eta: float = 0.0
) -> torch.Tensor:
    """Denoising step t -> t-Δ; equals `DDIMScheduler.step(..., eta=0).prev_sample`.

    With `eta` above 0 it is the deterministic part of a stochastic step, as edit-friendly DDPM's
    authors write it (inbarhub/DDPM_inversion `reverse_step`): `sqrt(ā_prev) x̂0 +
    sqrt(1 - ā_prev - η σ²_t) ε`, to which they add the noise term `η σ_t z`
    (`step_variance`). DDIM's own eta step has `η² σ²` under the square root; the two agree at
    η = 1, the value that method runs with.

    Args:
        schedule (`DDIMSchedule`): noise levels and prediction type.
        model_output (`torch.Tensor`): the (guided) model output at `timestep` for `sample`.
        timestep (`int` or `torch.Tensor`): the current timestep t (or one per row, `[B]`).
        sample (`torch.Tensor`): the latent at t.
        eta (`float`, defaults to 0.0): η; 0 is the DDIM step.
    """
    alpha_t = schedule.alpha(timestep)
    eps = to_epsilon(model_output, sample, alpha_t, schedule.prediction_type)
    variance = eta * step_variance(schedule, timestep) if eta else 0.0
    return _ddim_move(eps, sample, alpha_t, schedule.alpha(timestep - schedule.step_ratio), variance)


def next_step(
    schedule: DDIMSchedule, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor
) -> torch.Tensor:
    """Inversion step t-Δ -> t.

    The model was evaluated at the destination `timestep` on `sample`, which is still at t-Δ
    (the usual DDIM-inversion approximation, exactly as the reference does). A v-prediction
    output is converted with the level of the timestep the model was called with.

    Args:
        schedule (`DDIMSchedule`): noise levels and prediction type.
        model_output (`torch.Tensor`): the model output at `timestep` for `sample`.
        timestep (`int` or `torch.Tensor`): the destination timestep t (or one per row, `[B]`).
        sample (`torch.Tensor`): the latent at t-Δ.
    """
    alpha_t = schedule.alpha(timestep)
    eps = to_epsilon(model_output, sample, alpha_t, schedule.prediction_type)
    return _ddim_move(eps, sample, schedule.alpha(timestep - schedule.step_ratio), alpha_t)
