"""Edit-friendly DDPM inversion (`method="ddpm"`): the package against a plain loop written from the
authors' code (tests/reference_methods.py), its exact round trip, batches against singles, its
edits with Prompt-to-Prompt, SDXL and v-prediction models, the command line and its mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_independent_pipeline, random_image
from reference_methods import ReferenceDDPMInversion, ddpm_invert, ddpm_sample

import nti_lightning as nti
from nti_lightning.cli import main
from nti_lightning.diffusion.ddpm import image_noises
from nti_lightning.editing import Replace
from nti_lightning.editing.edit import EditJob, edit_jobs_latents, edit_latents
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import FORMAT_VERSION, ArtifactError, Inversion
from nti_lightning.inversion.methods import method_of
from nti_lightning.inversion.methods.ddpm import image_seed

ROOT = Path(__file__).resolve().parents[1]
T, SKIP = 6, 2
PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ddpm(pipe, images, prompts, **options):
    settings = {"skip": SKIP, **options.pop("method_options", {})}
    return nti.invert(pipe, images, prompts, num_inference_steps=T, method="ddpm", method_options=settings,
                      progress_bar=False, **options)


@pytest.fixture(scope="module")
def inverted(independent_pipeline):
    return ddpm(independent_pipeline, [random_image(seed) for seed in range(3)], PROMPTS, batch_size=2)


def test_maps_start_and_edits_match_the_authors_loop(independent_pipeline, inverted):
    pipe, result = independent_pipeline, inverted[0]
    assert result.metadata["method"] == "ddpm" and result.metadata["method_options"]["skip"] == SKIP
    noise = image_noises(result.source_latent.shape, T, image_seed(0, result.metadata["id"]))
    xts, zs = ddpm_invert(pipe, result.source_latent[None], result.prompt, num_steps=T, guidance_scale=1.0,
                          noise=noise)
    sigmas = _sigmas(pipe).float()
    # The stored noise terms are the authors' σ_t z_t; z_T is their corrected x at the skip.
    torch.testing.assert_close(result.latent_offsets, sigmas.view(-1, 1, 1, 1) * zs, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.z_T, xts[SKIP], rtol=0, atol=1e-5)
    # An edit: the source row at the source w (1), the target at 7.5, the same maps on both rows.
    prompts = [result.prompt, "a blue circle"]
    ours = edit_latents(pipe, result, prompts)
    theirs = ddpm_sample(pipe, xts[SKIP], zs, prompts, guidance_scale=[1.0, 7.5], skip=SKIP)
    assert relative(ours, theirs) < 1e-4
    # Every map kept: the source row lands on z0 (the authors' own loop too).
    assert relative(ours[0], result.source_latent) < 1e-4 and relative(theirs[0], result.source_latent) < 1e-4


def _sigmas(pipe) -> torch.Tensor:
    """σ_t of each step, from the reference's own `mean_sigma`."""
    reference = ReferenceDDPMInversion(pipe, T)
    zero = torch.zeros(1)
    return torch.stack([torch.as_tensor(reference.mean_sigma(zero, t, zero)[1]) for t in reference.scheduler.timesteps])


def test_the_round_trip_is_exact_and_the_authors_zeroed_last_map_is_an_option(independent_pipeline, inverted):
    pipe = independent_pipeline
    for result in inverted:
        reconstruction = nti.api.reconstruction_latents(pipe, result)
        # float rounding of the step's sums only (measured 7e-6)
        assert relative(reconstruction[0], result.source_latent) < 1e-4
    zeroed = Inversion(**{**inverted[0].__dict__, "metadata": {
        **inverted[0].metadata, "method_options": {**inverted[0].metadata["method_options"], "keep_last_map": False}}})
    off = nti.api.reconstruction_latents(pipe, zeroed)[0]
    # ...the authors' `zs[0] = 0`: the last step ends at its mean, σ_1 z_1 away from z0
    torch.testing.assert_close(off + inverted[0].latent_offsets[-1], inverted[0].source_latent, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheduling", ["continuous", "lockstep"])
def test_batch_gives_each_image_its_single_result(independent_pipeline, inverted, scheduling):
    images = [random_image(seed) for seed in range(3)]
    together = inverted if scheduling == "continuous" else ddpm(
        independent_pipeline, images, PROMPTS, batch_size=2, scheduling=scheduling
    )
    for image, prompt, batched in zip(images, PROMPTS, together):
        [alone] = ddpm(independent_pipeline, image, prompt, batch_size=1, ids=[batched.metadata["id"]])
        torch.testing.assert_close(batched.z_T, alone.z_T, rtol=1e-5, atol=1e-5)
        assert relative(batched.latent_offsets, alone.latent_offsets) < 1e-4


def test_prompt_to_prompt_edits_batched_with_other_methods_equal_each_alone(independent_pipeline, inverted):
    pipe = independent_pipeline
    [ddim] = nti.invert(pipe, random_image(5), PROMPTS[0], num_inference_steps=T, method="ddim", progress_bar=False)
    target = "a blue circle"

    def job(inversion):
        prompts = [inversion.prompt, target]
        return EditJob(inversion, prompts, Replace(prompts, pipe.tokenizer, 0.8, 0.6))

    alone = [edit_jobs_latents(pipe, [job(inversion)])[0] for inversion in (inverted[0], ddim)]
    together = edit_jobs_latents(pipe, [job(inverted[0]), job(ddim)])
    for a, b in zip(together, alone):
        assert relative(a, b) < 1e-4
    # The controller changes the DDPM edit, and its source row still lands on z0.
    plain = edit_latents(pipe, inverted[0], [inverted[0].prompt, target])
    assert relative(alone[0][1], plain[1]) > 1e-3
    assert relative(alone[0][0], inverted[0].source_latent) < 1e-4


def test_v_prediction_and_sdxl_models_round_trip(independent_xl_pipeline):
    v_pipe = build_independent_pipeline(prediction_type="v_prediction")
    for pipe in (v_pipe, independent_xl_pipeline):
        [result] = ddpm(pipe, random_image(1), PROMPTS[0])
        assert relative(nti.api.reconstruction_latents(pipe, result)[0], result.source_latent) < 1e-4
        edited = edit_latents(pipe, result, [PROMPTS[0], "a blue circle"])
        assert torch.isfinite(edited).all() and relative(edited[1], edited[0]) > 1e-3


def test_artifact_is_format_4_and_keeps_its_settings(inverted, tmp_path, independent_pipeline):
    path = inverted[0].save(tmp_path / "a.safetensors")
    loaded = Inversion.load(path)
    assert Inversion.read_metadata(path)["method"] == "ddpm"
    import json

    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        assert json.loads(handle.metadata()["nti"])["format_version"] == FORMAT_VERSION == 4
    assert method_of(loaded).options["skip"] == SKIP
    torch.testing.assert_close(edit_latents(independent_pipeline, loaded, [loaded.prompt]),
                               edit_latents(independent_pipeline, inverted[0], [loaded.prompt]), rtol=0, atol=0)
    with pytest.raises(OptionError, match=r"the edit-friendly DDPM inversion \(method 'ddpm'\) is sampled with steps"):
        nti.pipeline_kwargs(independent_pipeline, loaded)
    loaded.metadata["method_options"] = {"quantile": 0.75}  # another method's settings
    with pytest.raises(ArtifactError, match=r"b.safetensors: the recorded method_options: ddpm has no setting quant"):
        method_of(loaded, "b.safetensors")
    loaded.metadata["method_options"] = {"skip": "twelve"}
    with pytest.raises(ArtifactError, match=r"b.safetensors: the recorded method_options.skip must be a whole"):
        method_of(loaded, "b.safetensors")


@pytest.mark.parametrize("options, culprit", [
    ({"skip": 6}, "model.method_options.skip must be below the 6 steps, got 6"),
    ({"skip": -1}, "model.method_options.skip must be a whole number"),
    ({"eta": 0}, "model.method_options.eta must be in (0, 1]"),
    ({"source_guidance_scale": "one"}, "model.method_options.source_guidance_scale must be a number"),
    ({"skipp": 3}, "model.method_options: ddpm has no setting skipp (its settings: skip, eta"),
])
def test_settings_out_of_range_are_refused_before_any_work(options, culprit):
    with pytest.raises(OptionError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        nti.NullTextInversion(method="ddpm", method_options=options, num_inference_steps=T)


def test_settings_of_a_method_that_has_none_are_refused():
    with pytest.raises(OptionError, match=r"method_options: null_text has no setting skip \(its settings: none\)"):
        nti.NullTextInversion(method="null_text", method_options={"skip": 1})


def test_fit_from_the_command_line_reconstructs_at_the_vae_round_trip(tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    images[0].save(tmp_path / "cat.png")
    main(["fit", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--data.image", "cat.png", "--data.prompt", "a cat",
          "--model.method", "ddpm", "--model.method_options", "{skip: 1}", "--model.output_dir", "out",
          "--trainer.logger", "false"])
    result = Inversion.load(tmp_path / "out" / "cat.safetensors")
    assert result.metadata["method"] == "ddpm" and method_of(result).options["skip"] == 1
    report = (tmp_path / "out" / "report.csv").read_text().splitlines()
    row = dict(zip(report[0].split(","), report[1].split(",")))
    assert float(row["latent_error"]) < 1e-4 and abs(float(row["psnr"]) - float(row["vae_psnr"])) < 0.01
