"""Batches whose rows sit at their own timesteps: each row is computed exactly as it is alone."""

import torch

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule, next_step, prev_step
from nti_lightning.diffusion.guidance import guided_step
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.text import PromptEncoder


def test_ddim_steps_and_guided_step_per_row_equal_the_rows_alone():
    pipe = load_pipeline("tiny-xl")
    for prediction_type in ("epsilon", "v_prediction"):
        config = {**pipe.scheduler.config, "prediction_type": prediction_type}
        schedule = DDIMSchedule.from_scheduler_config(config, 10)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(3, 4, 8, 8, generator=generator)
        output = torch.randn(3, 4, 8, 8, generator=generator)
        timesteps = schedule.timesteps[torch.tensor([0, 4, 9])]  # the last one steps past timestep 0
        for step in (prev_step, next_step):
            together = step(schedule, output, timesteps, latents)
            for row, timestep in enumerate(timesteps.tolist()):
                alone = step(schedule, output[row : row + 1], timestep, latents[row : row + 1])
                assert torch.equal(together[row : row + 1], alone), (step.__name__, prediction_type, row)
    encoder = PromptEncoder.of(pipe)
    cond = encoder.encode(["a red circle", "a blue square", "a cat"])
    null = encoder.null().expand(3)
    schedule = DDIMSchedule.from_scheduler_config(pipe.scheduler.config, 10)
    together = guided_step(schedule, pipe.unet, latents, timesteps, null, cond, 7.5)
    for row, timestep in enumerate(timesteps.tolist()):
        alone = guided_step(schedule, pipe.unet, latents[row : row + 1], timestep, null.rows(row), cond.rows(row), 7.5)
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-5)  # batched UNet kernels
    assert isinstance(Condition.cat([null, cond]), Condition)
