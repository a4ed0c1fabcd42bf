"""`pipeline_kwargs`: diffusers' own `StableDiffusionPipeline` / `StableDiffusionXLPipeline`, called
with an inversion's keyword arguments, give `reconstruct`'s images to the pixel (and its latents
to the bit); the user's callbacks compose with the null swap; bad input is refused by name."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_image
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import SDCFGCutoffCallback

import nti_lightning as nti
from nti_lightning.api import reconstruction_latents
from nti_lightning.diffusion.ddim import DDIMSchedule, prev_step
from nti_lightning.diffusion.guidance import predict
from nti_lightning.editing.edit import edit_latents, null_conditions
from nti_lightning.errors import ModelError, OptionError
from nti_lightning.inversion.sampling import sample
from nti_lightning.models.text import PromptEncoder
from nti_lightning.models.tiny import tiny_pipeline

T, N = 5, 3
PROMPT = "a red circle on a blue background"
SWAP = "a green square on a yellow background"


@pytest.fixture(scope="module")
def sd():
    pipe = nti.load_pipeline("tiny")
    # w = 5, not invert's 7.5: pipeline_kwargs must take the inversion's own.
    [inversion] = nti.invert(
        pipe, random_image(3), PROMPT, num_inference_steps=T, num_inner_steps=N, guidance_scale=5.0
    )
    return pipe, inversion


@pytest.fixture(scope="module")
def sdxl():
    pipe = nti.load_pipeline("tiny-xl")
    [inversion] = nti.invert(
        pipe, random_image(4), PROMPT, num_inference_steps=T, num_inner_steps=N, guidance_scale=6.0
    )
    return pipe, inversion


@contextmanager
def scheduler_set(pipe, scheduler):
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def assert_pipeline_is_reconstruct(pipe, inversion, prompt):
    kwargs = nti.pipeline_kwargs(pipe, inversion, prompt=prompt)
    image = pipe(**kwargs, output_type="pil").images[0]
    expected = nti.reconstruct(pipe, inversion, prompt=prompt, guidance_scale=inversion.guidance_scale)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # The same to the bit before decoding: no rounding hides a difference.
    latents = pipe(**nti.pipeline_kwargs(pipe, inversion, prompt=prompt), output_type="latent").images
    assert torch.equal(latents, reconstruction_latents(pipe, inversion, prompt, inversion.guidance_scale))
    # The per-step nulls are what makes it so: step 0's null alone (no swap) samples another image.
    kwargs = nti.pipeline_kwargs(pipe, inversion, prompt=prompt)
    del kwargs["callback_on_step_end"], kwargs["callback_on_step_end_tensor_inputs"]
    unswapped = pipe(**kwargs, output_type="latent").images
    assert (unswapped - latents).abs().max() > 1e-2


@pytest.mark.parametrize("prompt", [None, SWAP], ids=["reconstruction", "prompt-swap"])
def test_stable_diffusion_pipeline_gives_reconstruct_to_the_pixel(sd, prompt):
    pipe, inversion = sd
    assert type(pipe) is StableDiffusionPipeline
    assert_pipeline_is_reconstruct(pipe, inversion, prompt)


@pytest.mark.parametrize("prompt", [None, SWAP], ids=["reconstruction", "prompt-swap"])
def test_stable_diffusion_xl_pipeline_gives_reconstruct_to_the_pixel(sdxl, prompt):
    pipe, inversion = sdxl
    assert type(pipe) is StableDiffusionXLPipeline
    assert_pipeline_is_reconstruct(pipe, inversion, prompt)


def test_the_keyword_arguments(sd, sdxl):
    pipe, inversion = sd
    kwargs = nti.pipeline_kwargs(pipe, inversion)
    assert kwargs["prompt"] == PROMPT and kwargs["num_inference_steps"] == T and kwargs["eta"] == 0.0
    assert kwargs["guidance_scale"] == inversion.guidance_scale == 5.0
    assert torch.equal(kwargs["latents"], inversion.z_T[None])
    assert torch.equal(kwargs["negative_prompt_embeds"], inversion.null_embeddings[:1])
    assert kwargs["callback_on_step_end_tensor_inputs"] == ["prompt_embeds", "latents"]
    assert nti.pipeline_kwargs(pipe, inversion, guidance_scale=3.0)["guidance_scale"] == 3.0
    assert nti.pipeline_kwargs(pipe, inversion, prompt=SWAP)["prompt"] == SWAP

    pipe, inversion = sdxl
    kwargs = nti.pipeline_kwargs(pipe, inversion)
    assert inversion.metadata["time_ids"] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert (kwargs["original_size"], kwargs["crops_coords_top_left"], kwargs["target_size"]) == (
        (32, 32),
        (0, 0),
        (32, 32),
    )
    assert torch.equal(kwargs["negative_pooled_prompt_embeds"], inversion.null_pooled_embeddings[:1])
    assert kwargs["callback_on_step_end_tensor_inputs"] == ["prompt_embeds", "add_text_embeds", "latents"]


def test_several_prompts_are_edit(sd):
    pipe, inversion = sd
    prompts = [PROMPT, SWAP]
    kwargs = nti.pipeline_kwargs(pipe, inversion, prompt=prompts)
    assert kwargs["prompt"] == prompts and kwargs["latents"].shape[0] == kwargs["negative_prompt_embeds"].shape[0] == 2
    images = pipe(**kwargs).images
    expected = nti.edit(pipe, inversion, prompts, guidance_scale=inversion.guidance_scale)
    assert [np.asarray(image).tolist() for image in images] == [np.asarray(image).tolist() for image in expected]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_users_callback_runs_at_every_step_and_its_changes_apply(sd, sdxl, kind):
    pipe, inversion = sd if kind == "sd" else sdxl
    expected_timesteps = DDIMSchedule.from_scheduler_config(pipe.scheduler.config, T).timesteps.tolist()
    calls = []

    def callback(pipeline, step, timestep, callback_kwargs):
        assert pipeline is pipe
        calls.append((step, int(timestep)))
        if step + 1 < T:  # it sees the next step's null, already in place
            embeds = callback_kwargs["prompt_embeds"]
            assert torch.equal(embeds[:1], inversion.null_embeddings[step + 1 : step + 2])
            if kind == "sdxl":
                assert torch.equal(
                    callback_kwargs["add_text_embeds"][:1], inversion.null_pooled_embeddings[step + 1 : step + 2]
                )
        # What it returns replaces the pipeline's tensor: the last latents doubled (exact in floats).
        return {"latents": callback_kwargs["latents"] * 2} if step == T - 1 else {}

    kwargs = nti.pipeline_kwargs(
        pipe, inversion, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"]
    )
    latents = pipe(**kwargs, output_type="latent").images
    assert calls == list(enumerate(expected_timesteps))
    assert torch.equal(latents, 2 * reconstruction_latents(pipe, inversion, None, inversion.guidance_scale))


def test_a_diffusers_pipeline_callback_composes(sd):
    """diffusers' own `SDCFGCutoffCallback` (its tensors taken from the object) turns guidance off
    after step T-2: the last step is then the DDIM step of the conditional output alone."""
    pipe, inversion = sd
    kwargs = nti.pipeline_kwargs(
        pipe, inversion, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=T - 2)
    )
    assert kwargs["callback_on_step_end_tensor_inputs"] == ["prompt_embeds"]
    latents = pipe(**kwargs, output_type="latent").images

    schedule = DDIMSchedule.from_scheduler_config(pipe.scheduler.config, T)
    cond = PromptEncoder.of(pipe).encode([PROMPT])
    all_but_last = replace(schedule, timesteps=schedule.timesteps[:-1])
    nulls = null_conditions(inversion, cond)[:-1]
    before_last = sample(pipe.unet, all_but_last, inversion.z_T[None], nulls, cond, inversion.guidance_scale)
    last = int(schedule.timesteps[-1])
    expected = prev_step(schedule, predict(pipe.unet, before_last, last, cond), last, before_last)
    assert torch.equal(latents, expected)


def test_other_schedulers_are_refused_with_the_fix(sd):
    pipe, inversion = sd
    ddim = pipe.scheduler.config
    bad = {
        "EulerDiscreteScheduler": EulerDiscreteScheduler.from_config(ddim),
        "clip_sample=True": DDIMScheduler.from_config(ddim, clip_sample=True),
        "set_alpha_to_one=True": DDIMScheduler.from_config(ddim, set_alpha_to_one=True),
        "another noise schedule": DDIMScheduler.from_config(ddim, beta_end=0.02),
        "takes timesteps": DDIMScheduler.from_config(ddim, timestep_spacing="trailing"),
    }
    for problem, scheduler in bad.items():
        with scheduler_set(pipe, scheduler), pytest.raises(ModelError, match=problem) as error:
            nti.pipeline_kwargs(pipe, inversion)
        assert "pipe.scheduler = DDIMScheduler.from_config(inversion.metadata['scheduler_config'], " in str(error.value)
    # The fix the message gives, applied to a pipeline loaded with another scheduler, works.
    with scheduler_set(pipe, EulerDiscreteScheduler.from_config(ddim)):
        pipe.scheduler = DDIMScheduler.from_config(
            inversion.metadata["scheduler_config"], clip_sample=False, set_alpha_to_one=False
        )
        assert_pipeline_is_reconstruct(pipe, inversion, None)


def test_other_models_are_refused(sd, sdxl):
    pipe, inversion = sd
    other = tiny_pipeline(seed=1)  # same shapes, other weights
    other.scheduler = pipe.scheduler
    with pytest.raises(ModelError, match=r"weights fingerprint [0-9a-f]{16}\), but this model .* has other weights"):
        nti.pipeline_kwargs(other, inversion)
    assert nti.pipeline_kwargs(other, inversion, allow_model_mismatch=True)["num_inference_steps"] == T
    with pytest.raises(ModelError, match="an SD 1.x/2.x inversion .* cannot be used with an SDXL model"):
        nti.pipeline_kwargs(sdxl[0], inversion)


def test_bad_options_are_refused(sd):
    pipe, inversion = sd
    with pytest.raises(OptionError, match="guidance_scale=1.0: .* only for a guidance_scale above 1"):
        nti.pipeline_kwargs(pipe, inversion, guidance_scale=1.0)
    with pytest.raises(OptionError, match="at least one prompt"):
        nti.pipeline_kwargs(pipe, inversion, prompt=[])
    kwargs = nti.pipeline_kwargs(pipe, inversion)
    kwargs["num_inference_steps"] = T + 1  # changed after the fact: the nulls would land on the wrong steps
    with pytest.raises(ModelError, match=f"call it with the inversion's num_inference_steps={T}"):
        pipe(**kwargs, output_type="latent")


def test_v_prediction_is_within_one_level():
    """`DDIMScheduler.step` finds a v-prediction model's x̂0 as `sqrt(ā) x - sqrt(1-ā) v`, the package
    (as the reference) from ε: the same algebra in another float rounding, so pixels may move by one
    level; for ε models the two are the same operations (the tests above)."""
    pipe = nti.load_pipeline("tiny-v")
    [inversion] = nti.invert(pipe, random_image(3), PROMPT, num_inference_steps=T, num_inner_steps=N)
    image = np.asarray(pipe(**nti.pipeline_kwargs(pipe, inversion)).images[0]).astype(int)
    expected = np.asarray(nti.reconstruct(pipe, inversion, guidance_scale=inversion.guidance_scale)).astype(int)
    assert np.abs(image - expected).max() <= 1


def test_direct_inversion_retraces_its_source_in_the_stock_pipeline():
    """A Direct Inversion's offsets go into the source prompt's rows: `edit`'s latents to the bit."""
    pipe = nti.load_pipeline("tiny")
    [inversion] = nti.invert(pipe, random_image(5), PROMPT, num_inference_steps=T, method="direct", progress_bar=False)
    prompts = [PROMPT, SWAP]
    latents = pipe(**nti.pipeline_kwargs(pipe, inversion, prompt=prompts), output_type="latent").images
    assert torch.equal(latents, edit_latents(pipe, inversion, prompts, guidance_scale=inversion.guidance_scale))
    # Back on the pivot's z0, up to the rounding a two-prompt batch amplifies over the guided steps
    # of this random model: 6.4e-3 relative measured at 1 thread, 8.2e-3 at 2 (an absolute 1e-3
    # sat on the measured 1.15e-3). Without the offsets the source row lands 56 away: 0.05 leaves
    # a factor 6 and still tells the two apart by a thousand.
    z0 = inversion.source_latent
    relative = lambda a: float((a - z0).norm() / z0.norm())  # noqa: E731
    # The same pivot without the offsets is a DDIM inversion (a file claiming Direct without them is refused).
    plain = nti.Inversion(
        inversion.z_T, inversion.null_embeddings, z0, inversion.prompt, {**inversion.metadata, "method": "ddim"}
    )
    assert relative(latents[0]) < 0.05
    assert relative(edit_latents(pipe, plain, prompts, guidance_scale=inversion.guidance_scale)[0]) > 1.0
