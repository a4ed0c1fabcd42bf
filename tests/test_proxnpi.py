"""ProxNPI (`method="proxnpi"`): negative-prompt inversion with proximal guidance, against a plain
loop written from the authors' code (tests/reference_methods.py), batches against singles, its
artifact and its mistakes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_independent_pipeline, random_image
from reference_methods import npi_invert, proxnpi_sample

import nti_lightning as nti
from nti_lightning.editing import Replace
from nti_lightning.editing.edit import EditJob, edit_jobs_latents, edit_latents
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.inversion.methods import method_of

T = 6
PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star"]
TARGET = "a blue circle"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def proxnpi(pipe, images, prompts, **options):
    return nti.invert(pipe, images, prompts, num_inference_steps=T, method="proxnpi", progress_bar=False, **options)


@pytest.fixture(scope="module")
def inverted(independent_pipeline):
    return proxnpi(independent_pipeline, [random_image(seed) for seed in range(3)], PROMPTS, batch_size=2)


@pytest.mark.parametrize("settings", [
    {},  # the authors' defaults: l0 at 0.75, the pull below t = 400
    {"recon_t": 1000, "dilate_mask": 0},  # the pull at every step, the mask as it is
    {"prox": "l1", "quantile": 0.5, "recon_lr": 0.5, "recon_t": 700},
    {"inversion_guidance": False},  # PnP Inversion's published row: the thresholding alone
])
def test_edits_match_the_authors_loop(independent_pipeline, settings):
    pipe = independent_pipeline
    [result] = proxnpi(pipe, random_image(0), PROMPTS[0], method_options=settings)
    x_stars, null = npi_invert(pipe, result.source_latent[None], result.prompt, num_steps=T)
    # The pivot: the reference's x*, kept as the latent each step lands on.
    torch.testing.assert_close(result.z_T, x_stars[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.pivot_latents, x_stars[:-1].flip(0), rtol=0, atol=1e-6)
    prompts = [result.prompt, TARGET]
    ours = edit_latents(pipe, result, prompts)
    theirs = proxnpi_sample(pipe, x_stars[-1], prompts, null, num_steps=T, x_stars=x_stars, **settings)
    assert relative(ours, theirs) < 1e-5  # bit for bit on this machine; a margin for others


def test_the_proximal_guidance_changes_the_edit_and_keeps_the_source_row(independent_pipeline, inverted):
    pipe, result = independent_pipeline, inverted[0]
    [npi] = nti.invert(pipe, random_image(0), PROMPTS[0], num_inference_steps=T, method="negative_prompt",
                       progress_bar=False)
    torch.testing.assert_close(npi.z_T, result.z_T, rtol=1e-5, atol=1e-5)  # the same inversion (a batch of 2 there)
    prompts = [result.prompt, TARGET]
    proximal, plain = edit_latents(pipe, result, prompts), edit_latents(pipe, npi, prompts)
    assert relative(proximal[1], plain[1]) > 1e-2
    # The source row's guidance difference is zero: below the threshold, outside every mask, so
    # the pull holds it on the pivot.
    assert relative(proximal[0], result.source_latent) < relative(plain[0], result.source_latent) + 1e-6


@pytest.mark.parametrize("scheduling", ["continuous", "lockstep"])
def test_batch_gives_each_image_its_single_result(independent_pipeline, inverted, scheduling):
    images = [random_image(seed) for seed in range(3)]
    together = inverted if scheduling == "continuous" else proxnpi(
        independent_pipeline, images, PROMPTS, batch_size=2, scheduling=scheduling
    )
    for image, prompt, batched in zip(images, PROMPTS, together):
        [alone] = proxnpi(independent_pipeline, image, prompt, batch_size=1)
        torch.testing.assert_close(batched.z_T, alone.z_T, rtol=1e-5, atol=1e-5)
        # batched kernels round differently from single ones
        assert relative(batched.pivot_latents, alone.pivot_latents) < 1e-5


def test_edits_sampled_together_each_threshold_their_own_rows(independent_pipeline, inverted):
    pipe = independent_pipeline

    def job(inversion):  # Prompt-to-Prompt where the words pair up, a plain prompt swap otherwise
        prompts = [inversion.prompt, TARGET]
        same_length = len(inversion.prompt.split()) == len(TARGET.split())
        return EditJob(inversion, prompts, Replace(prompts, pipe.tokenizer, 0.8, 0.6) if same_length else None)

    together = edit_jobs_latents(pipe, [job(inversion) for inversion in inverted])
    for inversion, latents in zip(inverted, together):
        [alone] = edit_jobs_latents(pipe, [job(inversion)])
        assert relative(latents, alone) < 1e-4


def test_artifact_keeps_the_pivot_and_a_damaged_one_is_refused(independent_pipeline, inverted, tmp_path):
    path = inverted[0].save(tmp_path / "a.safetensors")
    loaded = Inversion.load(path)
    torch.testing.assert_close(loaded.pivot_latents, inverted[0].pivot_latents, rtol=0, atol=0)
    assert method_of(loaded).options["quantile"] == 0.75
    loaded.pivot_latents = None
    with pytest.raises(ValueError, match=r"a.safetensors: made by method 'proxnpi', but has no pivot latents"):
        check_compatible(independent_pipeline, loaded, name="a.safetensors")


@pytest.mark.parametrize("options, culprit", [
    ({"prox": "l2"}, r"model.method_options.prox must be one of \('l0', 'l1'\), got 'l2'"),
    ({"quantile": 1.5}, r"model.method_options.quantile must be in \(0, 1\]"),
    ({"recon_t": -400}, r"model.method_options.recon_t must be a timestep in \[0, 1000\]"),
    ({"dilate_mask": 1.5}, r"model.method_options.dilate_mask must be a whole number"),
])
def test_settings_out_of_range_are_refused(options, culprit):
    with pytest.raises(OptionError, match=culprit):
        nti.NullTextInversion(method="proxnpi", method_options=options)


def test_v_prediction_and_sdxl_models_edit(independent_xl_pipeline):
    v_pipe = build_independent_pipeline(prediction_type="v_prediction")
    for pipe in (v_pipe, independent_xl_pipeline):
        [result] = proxnpi(pipe, random_image(1), PROMPTS[0], method_options={"recon_t": 1000})
        [npi] = nti.invert(pipe, random_image(1), PROMPTS[0], num_inference_steps=T, method="negative_prompt",
                           progress_bar=False)
        proximal = edit_latents(pipe, result, [PROMPTS[0], TARGET])
        plain = edit_latents(pipe, npi, [PROMPTS[0], TARGET])
        assert torch.isfinite(proximal).all() and relative(proximal[1], plain[1]) > 1e-3
        # the pull at every step holds the source row on the pivot: it ends on z0's pivot end
        assert relative(proximal[0], result.source_latent) <= relative(plain[0], result.source_latent) + 1e-6
