"""SDXL: the package on `tiny-xl` against the independent plain-loop reference (tests/reference_xl.py),
batches against singles, DDP, artifacts, Prompt-to-Prompt against the authors' controllers, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import p2p_reference as ref
import pytest
import torch
from conftest import random_image, run_in_process, running_quietly, write_dataset
from reference import clear_stopping_epsilon
from reference_xl import ReferenceNullInversionXL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nti_lightning as nti
from nti_lightning.api import reconstruction_latents
from nti_lightning.cli import main as fit_main
from nti_lightning.data.images import prepare
from nti_lightning.editing import AttentionLayer, Refine, Replace, Reweight
from nti_lightning.editing.cli import main as predict_main
from nti_lightning.editing.edit import edit_latents
from nti_lightning.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
T, N = 6, 4
RESOLUTION = 32
PROMPT = "a red circle on a blue background"
BATCH_PROMPTS = [PROMPT, "a blue square on a green background", "a yellow star"]


@pytest.fixture(scope="module")
def pipe():
    return nti.load_pipeline("tiny-xl")


def run_reference(pipe, image, prompt, epsilon):
    reference = ReferenceNullInversionXL(pipe, num_ddim_steps=T)
    return reference.invert(prepare(image, RESOLUTION)[None], prompt, num_inner_steps=N, epsilon=epsilon)


@pytest.fixture(scope="module")
def stopping_epsilon(pipe):
    """An ε at which some steps of image 0 stop early and others do not, clear of every loss."""
    inputs = [(prepare(random_image(seed), RESOLUTION)[None], prompt) for seed, prompt in enumerate(BATCH_PROMPTS)]
    return clear_stopping_epsilon(ReferenceNullInversionXL(pipe, num_ddim_steps=T), inputs, N)


@pytest.fixture(scope="module")
def inversion(pipe):
    [result] = nti.invert(pipe, random_image(3), PROMPT, num_inference_steps=T, num_inner_steps=N)
    return result


@pytest.mark.parametrize("early_stop", [False, True])
def test_invert_matches_the_reference_bit_for_bit(pipe, stopping_epsilon, early_stop):
    epsilon = stopping_epsilon if early_stop else 1e-5
    image = random_image(0)
    expected = run_reference(pipe, image, PROMPT, epsilon)
    [result] = nti.invert(pipe, image, PROMPT, num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=epsilon)
    if early_stop:
        assert 1 in expected["inner_iterations"] and N in expected["inner_iterations"]
    else:
        assert expected["inner_iterations"] == [N] * T
    assert result.metadata["inner_iterations"] == expected["inner_iterations"]
    assert result.metadata["final_losses"] == expected["final_losses"]
    assert result.metadata["time_ids"] == expected["time_ids"] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert torch.equal(result.source_latent, expected["source_latent"])
    assert torch.equal(result.z_T, expected["z_T"])
    assert result.null_embeddings.shape == (T, 77, 96) and result.null_pooled_embeddings.shape == (T, 32)
    assert torch.equal(result.null_embeddings, expected["null_embeddings"])
    assert torch.equal(result.null_pooled_embeddings, expected["null_pooled_embeddings"])
    assert float(result.null_pooled_embeddings.abs().max()) > 1e-3  # the pooled null really was tuned
    assert torch.equal(reconstruction_latents(pipe, result), expected["reconstruction"])


def test_batch_gives_each_image_its_single_result(pipe, stopping_epsilon):
    images = [random_image(seed) for seed in range(3)]
    prompts = BATCH_PROMPTS
    options = dict(num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=stopping_epsilon)
    batched = nti.invert(pipe, images, prompts, batch_size=3, **options)
    for image, prompt, together in zip(images, prompts, batched):
        [alone] = nti.invert(pipe, image, prompt, batch_size=1, **options)
        assert together.prompt == prompt
        assert together.metadata["inner_iterations"] == alone.metadata["inner_iterations"]
        assert float((together.z_T - alone.z_T).norm() / alone.z_T.norm()) < 1e-5
        # the tolerance of the SD batch test (tests/test_reference.py)
        assert float((together.null_embeddings - alone.null_embeddings).abs().max()) < 5e-3
        assert float((together.null_pooled_embeddings - alone.null_pooled_embeddings).abs().max()) < 5e-3
        torch.testing.assert_close(
            reconstruction_latents(pipe, together), reconstruction_latents(pipe, alone), rtol=0, atol=1e-3
        )
    assert len({tuple(b.metadata["inner_iterations"]) for b in batched}) > 1


def test_gradient_checkpointing_changes_nothing_and_is_undone(pipe):
    options = dict(num_inference_steps=2, num_inner_steps=3)
    [plain] = nti.invert(pipe, random_image(4), PROMPT, **options)
    [checkpointed] = nti.invert(pipe, random_image(4), PROMPT, gradient_checkpointing=True, **options)
    assert not pipe.unet.is_gradient_checkpointing  # the caller's pipeline is left as it was
    torch.testing.assert_close(checkpointed.null_embeddings, plain.null_embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(checkpointed.null_pooled_embeddings, plain.null_pooled_embeddings, rtol=0, atol=1e-6)


def test_negative_prompt_method_uses_the_prompt_condition(pipe):
    [result] = nti.invert(
        pipe, random_image(5), PROMPT, num_inference_steps=3, num_inner_steps=2, method="negative_prompt"
    )
    cond = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(result.null_embeddings, cond[0].expand(3, -1, -1))
    assert torch.equal(result.null_pooled_embeddings, cond[2].expand(3, -1))


def test_artifact_round_trip_and_sd_sdxl_mismatch(pipe, inversion, tmp_path):
    path = inversion.save(tmp_path / "xl.safetensors")
    loaded = nti.Inversion.load(path)
    assert loaded.is_sdxl and torch.equal(loaded.null_pooled_embeddings, inversion.null_pooled_embeddings)
    assert torch.equal(loaded.null_embeddings, inversion.null_embeddings)
    assert loaded.metadata["time_ids"] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert nti.Inversion.read_metadata(path)["pooled_shape"] == [32]
    torch.testing.assert_close(
        reconstruction_latents(pipe, loaded), reconstruction_latents(pipe, inversion), rtol=0, atol=0
    )

    sd = nti.load_pipeline("tiny")
    with pytest.raises(
        ModelError,
        match=r"an SDXL inversion \(made with 'tiny-xl'\) cannot be used with an SD 1.x/2.x model \('tiny'\)",
    ):
        nti.reconstruct(sd, loaded)
    [sd_inversion] = nti.invert(sd, random_image(1), PROMPT, num_inference_steps=2, num_inner_steps=1)
    assert sd_inversion.null_pooled_embeddings is None and "time_ids" not in sd_inversion.metadata
    with pytest.raises(
        ModelError,
        match=r"an SD 1.x/2.x inversion \(made with 'tiny'\) cannot be used with an SDXL model \('tiny-xl'\)",
    ):
        nti.reconstruct(pipe, sd_inversion)
    sd_path = sd_inversion.save(tmp_path / "sd.safetensors")  # SD artifacts keep format 1
    assert json.loads(_header(sd_path)["__metadata__"]["nti"])["format_version"] == 1
    assert json.loads(_header(path)["__metadata__"]["nti"])["format_version"] == 2


def _header(path: Path) -> dict:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])


def test_artifact_without_pooled_shape_or_time_ids_is_refused(inversion, tmp_path):
    broken = nti.Inversion(
        inversion.z_T, inversion.null_embeddings, inversion.source_latent, inversion.prompt,
        {k: v for k, v in inversion.metadata.items() if k != "time_ids"}, inversion.null_pooled_embeddings,
    )
    path = broken.save(tmp_path / "no-ids.safetensors")
    with pytest.raises(nti.ArtifactError, match="no-ids.safetensors: an SDXL inversion needs its six time_ids"):
        nti.Inversion.load(path)
    short = nti.Inversion(
        inversion.z_T, inversion.null_embeddings, inversion.source_latent, inversion.prompt, inversion.metadata,
        inversion.null_pooled_embeddings[:-1],
    )
    with pytest.raises(nti.ArtifactError, match=r"null_pooled_embeddings \(5, 32\) should be \[6, width\]"):
        nti.Inversion.load(short.save(tmp_path / "short.safetensors"))


def test_edit_with_the_source_prompt_is_reconstruct(pipe, inversion):
    reconstruction = reconstruction_latents(pipe, inversion)
    assert torch.equal(edit_latents(pipe, inversion, [inversion.prompt]), reconstruction)
    image = nti.reconstruct(pipe, inversion)
    assert image.size == (RESOLUTION, RESOLUTION)


def _controllers(kind: str, tokenizer):
    if kind == "replace":
        prompts = [PROMPT, "a red square on a blue background"]
        return prompts, Replace(prompts, tokenizer, 0.8, 0.4), ref.AttentionReplace(prompts, T, 0.8, 0.4, tokenizer)
    if kind == "replace_blend":
        prompts = [PROMPT, "a red square on a blue background"]
        # A random model's maps are nearly flat: the finer 8x8 maps and a high threshold give a
        # mask of part of the image.
        ours_blend = nti.LocalBlend(prompts, tokenizer, [["circle"], ["square"]], threshold=0.95, resolution=8)
        theirs_blend = ref.LocalBlend(prompts, ["circle", "square"], tokenizer, T, threshold=0.95, resolution=8)
        ours = Replace(prompts, tokenizer, {"default_": 0.8, "square": 0.5}, 0.6, local_blend=ours_blend)
        theirs = ref.AttentionReplace(
            prompts, T, {"default_": 0.8, "square": 0.5}, 0.6, tokenizer, local_blend=theirs_blend
        )
        return prompts, ours, theirs
    if kind == "refine":
        prompts = [PROMPT, "a big red circle on a blue background"]
        return prompts, Refine(prompts, tokenizer, 0.8, 0.4), ref.AttentionRefine(prompts, T, 0.8, 0.4, tokenizer)
    prompts = [PROMPT, PROMPT]
    equalizer = ref.get_equalizer(PROMPT, ("red",), (4.0,), tokenizer)
    ours = Reweight(prompts, tokenizer, words={"red": 4.0}, cross_replace_steps=0.8, self_replace_steps=0.4)
    return prompts, ours, ref.AttentionReweight(prompts, T, 0.8, 0.4, equalizer, tokenizer)


@pytest.mark.parametrize("kind", ["replace", "replace_blend", "refine", "reweight"])
def test_prompt_to_prompt_agrees_with_the_authors_code(pipe, inversion, kind):
    prompts, ours, theirs = _controllers(kind, pipe.tokenizer)
    expected = ref.reference_edit_xl(pipe, inversion, prompts, theirs)
    latents = edit_latents(pipe, inversion, prompts, controller=ours)
    assert torch.allclose(latents, expected, atol=1e-5), (latents - expected).abs().max()
    assert (latents[1] - edit_latents(pipe, inversion, prompts)[1]).abs().max() > 1e-3  # the control did something
    assert ours.store.resolutions() == [4, 8]  # tiny-xl attends at two resolutions, as SDXL
    if ours.local_blend is not None:
        assert 0.05 < ours.local_blend.mask(ours.store, (8, 8))[1].float().mean() < 0.95


def test_self_replacement_layers_are_chosen_by_query_count(pipe):
    prompts = [PROMPT, "a red square on a blue background"]
    maps = torch.rand(2, 2, 64, 64).softmax(-1)
    coarse = torch.rand(2, 2, 16, 16).softmax(-1)
    layer = AttentionLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", "down", False)
    default = Replace(prompts, pipe.tokenizer, self_replace_steps=1.0).begin(4)
    assert torch.equal(default(maps.clone(), layer)[1], maps[0])  # 8x8 <= 32x32: replaced
    only_coarse = Replace(prompts, pipe.tokenizer, self_replace_steps=1.0, self_replace_max_queries=16).begin(4)
    assert torch.equal(only_coarse(maps.clone(), layer), maps)  # 8x8 > 4x4: left alone
    assert torch.equal(only_coarse(coarse.clone(), layer)[1], coarse[0])
    with pytest.raises(ValueError, match="self_replace_max_queries"):
        Replace(prompts, pipe.tokenizer, self_replace_max_queries=0)
    # LocalBlend at a finer resolution than 32x32 makes the controller keep those maps
    blend = nti.LocalBlend(prompts, pipe.tokenizer, [["circle"], ["square"]], resolution=64)
    assert Replace(prompts, pipe.tokenizer, local_blend=blend).new_store().max_queries == 64**2


def test_two_process_ddp_equals_one_process(tmp_path):
    manifest = write_dataset(tmp_path, 3, first_seed=200)
    command = [sys.executable, "-m", "nti_lightning.cli", "fit", "--config", str(ROOT / "tests/configs/tiny_xl.yaml"),
               "--trainer.logger", "false", "--data.manifest", str(manifest), "--data.batch_size", "1"]
    with running_quietly(
        [*command, "--model.output_dir", "two", "--trainer.devices", "2", "--trainer.strategy", "ddp"], tmp_path
    ) as two_processes:
        # meanwhile one process: this one, on one thread as each DDP process
        run_in_process([*command[3:], "--model.output_dir", "one"], tmp_path)
        result = two_processes()
    assert "3 inverted, 0 skipped (already done), 0 failed" in result.stdout
    for i in range(3):
        a = nti.Inversion.load(tmp_path / "one" / f"img{i}.safetensors")
        b = nti.Inversion.load(tmp_path / "two" / f"img{i}.safetensors")
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]
        assert torch.allclose(a.z_T, b.z_T, atol=1e-5, rtol=0)
        assert torch.allclose(a.null_embeddings, b.null_embeddings, atol=1e-5, rtol=0)
        assert torch.allclose(a.null_pooled_embeddings, b.null_pooled_embeddings, atol=1e-5, rtol=0)


def test_fit_and_predict_with_the_shipped_tiny_xl_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The shipped configs, with fewer steps (T and N are checked elsewhere; the wiring here).
    fit_main(["fit", "--config", str(ROOT / "configs/tiny_xl.yaml"), "--data.image",
              str(ROOT / "configs/images/shapes.png"), "--model.num_inference_steps", "10",
              "--model.num_inner_steps", "3"])
    out = tmp_path / "inversions" / "tiny-xl"
    inversion = nti.Inversion.load(out / "shapes.safetensors")
    assert inversion.null_embeddings.shape == (10, 77, 96) and inversion.null_pooled_embeddings.shape == (10, 32)
    assert inversion.metadata["model"] == "tiny-xl"
    assert inversion.metadata["time_ids"] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert set(inversion.metadata["metrics"]) >= {"psnr", "ssim", "vae_psnr", "ddim_psnr"}
    assert (out / "shapes.png").stat().st_size > 0 and (out / "report.csv").exists()
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert {"timestep/loss", "reconstruction/psnr"} <= set(accumulator.Tags()["scalars"])
    assert "grid/shapes" in accumulator.Tags()["images"]

    predict_main(["predict", "--config", str(ROOT / "configs/edit_tiny_xl.yaml")])
    edits = tmp_path / "edits" / "tiny-xl"
    for name in ("shapes-green", "shapes-watercolor", "shapes-more-red"):
        assert (edits / f"{name}.png").stat().st_size > 0
        assert (edits / f"{name}_edit1.png").exists() and (edits / f"{name}_attention.png").exists()
    assert not (edits / "failures.jsonl").exists() or not (edits / "failures.jsonl").read_text().strip()
