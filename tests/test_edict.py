"""EDICT (`method="edict"`): the package against a plain loop written from the authors' code
(tests/reference_methods.py), its exact round trip, batches against singles, SDXL and
v-prediction models, its artifact and its mistakes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_independent_pipeline, random_image
from reference_methods import edict_invert, edict_sample

import nti_lightning as nti
from nti_lightning.api import reconstruction_latents
from nti_lightning.editing import Replace
from nti_lightning.editing.edit import EditJob, edit_jobs_latents, edit_latents
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.inversion.methods import method_of

# T divides 1000: the authors' step to t - 1000 / T is then the scheduler's integer stride.
T = 5
PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star"]
TARGET = "a blue circle"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def edict(pipe, images, prompts, **options):
    return nti.invert(pipe, images, prompts, num_inference_steps=T, method="edict", progress_bar=False, **options)


@pytest.fixture(scope="module")
def inverted(independent_pipeline):
    return edict(independent_pipeline, [random_image(seed) for seed in range(3)], PROMPTS, batch_size=2)


@pytest.mark.parametrize("settings", [{}, {"guidance_scale": 7.0, "strength": 1.0}])  # editing's, reconstruction's
def test_the_pair_and_the_edits_match_the_authors_loop(independent_pipeline, settings):
    pipe = independent_pipeline
    [result] = edict(pipe, random_image(0), PROMPTS[0], method_options=settings)
    w, strength = settings.get("guidance_scale", 3.0), settings.get("strength", 0.8)
    x, y = edict_invert(pipe, result.source_latent[None], result.prompt, num_steps=T, guidance_scale=w,
                        strength=strength)
    assert result.coupled_latents.dtype == torch.float64
    # The reference calls the UNet once per branch, the package once for both: fp32 rounding that
    # EDICT's inverse steps amplify (5e-6 measured; 1e-7 with a float64 UNet).
    assert relative(result.coupled_latents[0], x[0]) < 1e-4 and relative(result.coupled_latents[1], y[0]) < 1e-4
    torch.testing.assert_close(result.z_T, result.coupled_latents[0].float(), rtol=0, atol=0)
    ours = edit_latents(pipe, result, [TARGET])
    theirs, _ = edict_sample(pipe, (x, y), TARGET, num_steps=T, guidance_scale=w, strength=strength)
    assert relative(ours[0], theirs[0]) < 1e-3  # 4e-5 measured


def test_the_round_trip_is_exact(independent_pipeline, inverted):
    pipe = independent_pipeline
    [alone] = edict(pipe, random_image(0), PROMPTS[0])
    # The same UNet calls undone: z0 to float64 rounding (0.0 measured)...
    assert relative(reconstruction_latents(pipe, alone)[0], alone.source_latent) < 1e-6
    for result in inverted:
        # ...and, for images inverted in a batch of two, to the fp32 rounding of a batch of another
        # size, which EDICT's steps amplify (8e-5 measured)
        assert relative(reconstruction_latents(pipe, result)[0], result.source_latent) < 1e-3


@pytest.mark.parametrize("scheduling", ["continuous", "lockstep"])
def test_batch_gives_each_image_its_single_result(independent_pipeline, inverted, scheduling):
    images = [random_image(seed) for seed in range(3)]
    together = inverted if scheduling == "continuous" else edict(
        independent_pipeline, images, PROMPTS, batch_size=2, scheduling=scheduling
    )
    for image, prompt, batched in zip(images, PROMPTS, together):
        [alone] = edict(independent_pipeline, image, prompt, batch_size=1)
        assert relative(batched.coupled_latents, alone.coupled_latents) < 1e-4


def test_edits_sampled_together_equal_each_alone_and_a_controller_is_refused(independent_pipeline, inverted):
    pipe = independent_pipeline
    jobs = [EditJob(inversion, [inversion.prompt, TARGET]) for inversion in inverted]
    together = edit_jobs_latents(pipe, jobs)
    for job, latents in zip(jobs, together):
        [alone] = edit_jobs_latents(pipe, [job])
        assert relative(latents, alone) < 1e-4
        assert relative(latents[0], job.inversion.source_latent) < 1e-3  # the source row comes back
    prompts = [inverted[0].prompt, TARGET]
    with pytest.raises(ValueError, match=r"an EDICT inversion is edited as its authors' code edits it"):
        edit_latents(pipe, inverted[0], prompts, controller=Replace(prompts, pipe.tokenizer, 0.8, 0.6))


def test_v_prediction_and_sdxl_models_round_trip(independent_xl_pipeline):
    v_pipe = build_independent_pipeline(prediction_type="v_prediction")
    for pipe in (v_pipe, independent_xl_pipeline):
        [result] = edict(pipe, random_image(1), PROMPTS[0])
        assert relative(reconstruction_latents(pipe, result)[0], result.source_latent) < 1e-6
        edited = edit_latents(pipe, result, [TARGET])
        assert torch.isfinite(edited).all() and relative(edited[0], result.source_latent) > 1e-3


def test_artifact_keeps_the_float64_pair_and_a_damaged_one_is_refused(independent_pipeline, inverted, tmp_path):
    path = inverted[0].save(tmp_path / "a.safetensors")
    loaded = Inversion.load(path)
    torch.testing.assert_close(loaded.coupled_latents, inverted[0].coupled_latents, rtol=0, atol=0)
    assert loaded.coupled_latents.dtype == torch.float64 and method_of(loaded).options["strength"] == 0.8
    assert relative(reconstruction_latents(independent_pipeline, loaded)[0], loaded.source_latent) < 1e-3
    loaded.coupled_latents = None
    with pytest.raises(ValueError, match=r"a.safetensors: made by method 'edict', but has no coupled latents"):
        check_compatible(independent_pipeline, loaded, name="a.safetensors")


@pytest.mark.parametrize("options, culprit", [
    ({"strength": 0}, r"model.method_options.strength must be in \(0, 1\]"),
    ({"strength": 0.1}, r"model.method_options.strength 0.1 leaves none of the 5 steps"),
    ({"mix_weight": 1.0}, r"model.method_options.mix_weight must be in \(0, 1\)"),
    ({"guidance_scale": "high"}, r"model.method_options.guidance_scale must be a number"),
])
def test_settings_out_of_range_are_refused(options, culprit):
    with pytest.raises(OptionError, match=culprit):
        nti.NullTextInversion(method="edict", method_options=options, num_inference_steps=T)
