"""DDIM steps against diffusers' scheduler, for epsilon and v-prediction."""

import pytest
import torch

from nti_lightning.diffusion.ddim import (
    DDIMSchedule,
    ddim_scheduler,
    next_step,
    prev_step,
)
from nti_lightning.models.tiny import SD_SCHEDULER_CONFIG


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prev_step_equals_diffusers_ddim_step(prediction_type):
    config = {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type}
    schedule = DDIMSchedule.from_scheduler_config(config, 50)
    scheduler = ddim_scheduler(config)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    output = torch.randn(2, 4, 8, 8, generator=generator)
    for timestep in [981, 501, 21, 1]:
        expected = scheduler.step(output, timestep, sample, eta=0.0).prev_sample
        torch.testing.assert_close(prev_step(schedule, output, timestep, sample), expected, rtol=1e-6, atol=1e-6)


def test_schedule_follows_config_steps_offset():
    with_offset = DDIMSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG, 50)
    assert with_offset.timesteps[0] == 981 and with_offset.timesteps[-1] == 1 and with_offset.step_ratio == 20
    no_offset = DDIMSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "steps_offset": 0}, 50)
    assert no_offset.timesteps[0] == 980 and no_offset.timesteps[-1] == 0
    # past timestep 0 the final alpha is ā[0] (set_alpha_to_one=False)
    assert float(no_offset.alpha(-20)) == pytest.approx(float(no_offset.alphas_cumprod[0]))


def test_scheduler_options_are_forced_like_the_reference():
    schedule = DDIMSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "set_alpha_to_one": True}, 10)
    assert schedule.final_alpha_cumprod == pytest.approx(float(schedule.alphas_cumprod[0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_next_step_is_inverse_of_prev_step_for_a_fixed_noise(prediction_type):
    """With the same ε, the next step from t-Δ and the prev step from t are exact inverses."""
    schedule = DDIMSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "prediction_type": "epsilon"}, 50)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
    schedule64 = DDIMSchedule(
        schedule.alphas_cumprod.double(), schedule.final_alpha_cumprod, schedule.timesteps, schedule.step_ratio
    )
    for timestep in [981, 401, 1]:
        there = next_step(schedule64, eps, timestep, x)
        back = prev_step(schedule64, eps, timestep, there)
        torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)


def test_v_prediction_is_converted_with_the_destination_level_in_next_step():
    """docs/ALGORITHM.md: ε = sqrt(ā_t) v + sqrt(1-ā_t) x with t the timestep the UNet was called with."""
    schedule = DDIMSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, 50)
    eps_schedule = DDIMSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG, 50)
    generator = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 1, 4, 8, 8, generator=generator)
    timestep = 401
    alpha_t = schedule.alphas_cumprod[timestep]
    eps = alpha_t.sqrt() * v + (1 - alpha_t).sqrt() * x
    torch.testing.assert_close(next_step(schedule, v, timestep, x), next_step(eps_schedule, eps, timestep, x))
