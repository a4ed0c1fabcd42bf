"""`SlotWalk`: continuous batching's core, against the reference loop and against single runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_image, run_in_process, run_quietly, write_dataset
from reference import ReferenceNullInversion, clear_stopping_epsilon
from test_progress import assert_log_progress

import nti_lightning as nti
from nti_lightning.data.images import prepare
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.inversion.slots import SlotWalk
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.text import PromptEncoder

ROOT = Path(__file__).resolve().parents[1]
T, N = 8, 5
PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star"]


def walk_images(pipe, images, prompts, slots: int, epsilon: float, admit_together: bool = True, **options):
    """Runs images through a `SlotWalk` of `slots` slots as a plain loop; returns the finished images by id."""
    encoder = PromptEncoder.of(pipe)
    schedule = DDIMSchedule.from_scheduler_config(pipe.scheduler.config, T)
    empty = encoder.null()
    null = [torch.zeros(slots, *t.shape[1:]).requires_grad_() for t in empty.tunable()]
    walk = SlotWalk(schedule, null, empty, 7.5, N, epsilon, 1e-2, **options)
    queue = list(enumerate(zip(images, prompts)))
    done = {}
    while queue or walk.busy:
        if walk.free_slots() and not walk.waiting and queue:
            count = slots if admit_together else 1
            batch, queue = queue[:count], queue[count:]
            pixels = torch.stack([prepare(image, 16) for _, (image, _) in batch])
            cond = encoder.encode([prompt for _, (_, prompt) in batch])
            walk.prepare(pipe.unet, pixels, vae_codec.encode(pipe.vae, pixels), cond,
                         [str(i) for i, _ in batch], [prompt for _, (_, prompt) in batch])
        walk.admit(pipe.unet)
        slots_now = walk.optimising_slots()
        if slots_now:
            rows = walk.call_rows(slots_now)
            mask = walk.optimising[rows]
            losses = walk.losses(pipe.unet, rows)
            (losses * mask).sum().backward()
            walk.update(slots_now, losses[mask])
        for image in walk.advance(pipe.unet, walk.ready_slots()):
            done[image.id] = image
    return done, walk


@pytest.fixture(scope="module")
def stopping_epsilon(independent_pipeline):
    """An ε at which some steps of image 0 stop early and others do not, clear of every loss."""
    inputs = [(prepare(random_image(seed), 16)[None], prompt) for seed, prompt in enumerate(PROMPTS)]
    return clear_stopping_epsilon(ReferenceNullInversion(independent_pipeline, num_ddim_steps=T), inputs, N)


@pytest.mark.parametrize("early_stop", [False, True])
def test_one_image_in_one_slot_is_the_reference_bit_for_bit(independent_pipeline, stopping_epsilon, early_stop):
    epsilon = stopping_epsilon if early_stop else 1e-5
    expected = ReferenceNullInversion(independent_pipeline, num_ddim_steps=T).invert(
        prepare(random_image(0), 16)[None], PROMPTS[0], num_inner_steps=N, epsilon=epsilon
    )
    done, walk = walk_images(independent_pipeline, [random_image(0)], PROMPTS[:1], slots=1, epsilon=epsilon)
    image = done["0"]
    assert image.iterations == expected["inner_iterations"] and image.losses == expected["final_losses"]
    if early_stop:
        assert 1 in image.iterations and N in image.iterations
    assert torch.equal(image.pivot.z_T[0], expected["z_T"])
    assert torch.equal(torch.cat(image.null_embeddings), expected["null_embeddings"])
    assert torch.equal(image.latent, expected["reconstruction"])
    # the reference's UNet rows: T pivot rows, and per step one conditional row, one per inner
    # iteration and two for the advance
    assert walk.unet_rows == T + sum(1 + n + 2 for n in expected["inner_iterations"])


def test_images_through_fewer_slots_get_their_single_results(independent_pipeline, stopping_epsilon):
    images = [random_image(seed) for seed in range(3)]
    together, walk = walk_images(independent_pipeline, images, PROMPTS, slots=2, epsilon=stopping_epsilon)
    rows = 0
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
        alone, single = walk_images(independent_pipeline, [image], [prompt], slots=1, epsilon=stopping_epsilon)
        a, b = together[str(i)], alone["0"]
        rows += single.unet_rows
        assert a.iterations == b.iterations
        assert float((a.pivot.z_T - b.pivot.z_T).norm() / b.pivot.z_T.norm()) < 1e-5
        assert float((torch.cat(a.null_embeddings) - torch.cat(b.null_embeddings)).abs().max()) < 5e-3
        torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=1e-3)
    assert len({tuple(image.iterations) for image in together.values()}) > 1  # they stopped differently
    assert walk.unet_rows == rows  # no row spent on a stopped image or an empty slot


def test_fixed_shapes_put_every_slot_through_every_call(independent_pipeline, stopping_epsilon):
    images = [random_image(seed) for seed in range(3)]
    sizes = []
    handle = independent_pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True
    )
    try:
        fixed, _ = walk_images(
            independent_pipeline, images, PROMPTS, slots=2, epsilon=stopping_epsilon, fixed_shapes=True
        )
    finally:
        handle.remove()
    assert set(sizes) == {2, 4}  # S rows (pivots, conditional outputs, inner iterations), 2S (advances)
    exiting, _ = walk_images(independent_pipeline, images, PROMPTS, slots=2, epsilon=stopping_epsilon)
    for key, image in exiting.items():
        assert fixed[key].iterations == image.iterations
        torch.testing.assert_close(
            torch.cat(fixed[key].null_embeddings), torch.cat(image.null_embeddings), rtol=0, atol=5e-3
        )


def test_reused_conditional_output_saves_a_row_per_step(independent_pipeline, stopping_epsilon):
    images = [random_image(seed) for seed in range(3)]
    plain, walk = walk_images(independent_pipeline, images, PROMPTS, slots=2, epsilon=stopping_epsilon)
    reused, reusing = walk_images(
        independent_pipeline, images, PROMPTS, slots=2, epsilon=stopping_epsilon, reuse_cond_output=True
    )
    steps = sum(len(image.iterations) for image in reused.values())
    assert reusing.unet_rows == walk.unet_rows - steps
    for key, image in plain.items():
        assert reused[key].iterations == image.iterations
        torch.testing.assert_close(reused[key].latent, image.latent, rtol=0, atol=1e-3)


# --------------------------------------------------------------------- through Lightning


def test_continuous_invert_is_the_reference_and_batches_give_single_results(independent_pipeline, stopping_epsilon):
    options = dict(
        num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=stopping_epsilon, scheduling="continuous"
    )
    expected = ReferenceNullInversion(independent_pipeline, num_ddim_steps=T).invert(
        prepare(random_image(0), 16)[None], PROMPTS[0], num_inner_steps=N, epsilon=stopping_epsilon
    )
    [alone] = nti.invert(independent_pipeline, random_image(0), PROMPTS[0], **options)
    assert alone.metadata["inner_iterations"] == expected["inner_iterations"]
    assert torch.equal(alone.null_embeddings, expected["null_embeddings"]) and torch.equal(alone.z_T, expected["z_T"])
    images = [random_image(seed) for seed in range(3)]
    together = nti.invert(independent_pipeline, images, PROMPTS, batch_size=2, **options)
    assert [inversion.prompt for inversion in together] == PROMPTS  # input order, whatever finished first
    lockstep = nti.invert(independent_pipeline, images, PROMPTS, batch_size=1, **{**options, "scheduling": "lockstep"})
    for a, b in zip(together, lockstep):
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]
        assert float((a.null_embeddings - b.null_embeddings).abs().max()) < 5e-3
    assert torch.equal(together[0].null_embeddings, alone.null_embeddings) or float(
        (together[0].null_embeddings - alone.null_embeddings).abs().max()
    ) < 5e-3


def test_continuous_fixed_shape_inner_loop_gives_the_same_results(independent_pipeline, stopping_epsilon):
    images = [random_image(seed) for seed in range(3)]
    options = dict(num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=stopping_epsilon,
                   scheduling="continuous", batch_size=2)
    exiting = nti.invert(independent_pipeline, images, PROMPTS, **options)
    fixed = nti.invert(independent_pipeline, images, PROMPTS, early_exit=False, **options)
    for a, b in zip(exiting, fixed):
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]
        assert float((a.null_embeddings - b.null_embeddings).abs().max()) < 5e-3


@pytest.mark.parametrize("method", ["negative_prompt", "ddim"])
def test_continuous_methods_without_optimisation_equal_lockstep(independent_pipeline, method):
    images = [random_image(seed) for seed in range(3)]
    options = dict(num_inference_steps=4, num_inner_steps=2, method=method)
    continuous = nti.invert(independent_pipeline, images, PROMPTS, batch_size=2, scheduling="continuous", **options)
    lockstep = nti.invert(independent_pipeline, images, PROMPTS, batch_size=2, scheduling="lockstep", **options)
    for a, b in zip(continuous, lockstep):
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"] == [0] * 4
        torch.testing.assert_close(a.null_embeddings, b.null_embeddings, rtol=0, atol=1e-6)


def test_continuous_fit_two_process_ddp_equals_one_process(tmp_path):
    manifest = write_dataset(tmp_path, 5, first_seed=300)
    # tests/configs/tiny.yaml's walk (T = 4, N = 3), with an ε at which some steps stop early and
    # others run all N, clear of every loss the reference compares on these images
    inputs = [(prepare(tmp_path / f"img{i}.png", 32)[None], f"a photo of thing {i}") for i in range(5)]
    epsilon = clear_stopping_epsilon(
        ReferenceNullInversion(nti.load_pipeline("tiny"), num_ddim_steps=4), inputs, 3,
        wanted=lambda results: {n < 3 for result in results for n in result["inner_iterations"]} == {True, False},
    )
    command = [sys.executable, "-m", "nti_lightning.cli", "fit", "--config", str(ROOT / "tests/configs/tiny.yaml"),
               "--data.manifest", str(manifest), "--data.batch_size", "2", "--model.scheduling", "continuous",
               "--model.early_stop_epsilon", repr(epsilon), "--model.sync_every", "3"]
    for name, extra in (("one", []), ("two", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        started = time.monotonic()
        arguments = [*command, "--model.output_dir", name, "--trainer.enable_progress_bar", "true", *extra]
        # one process: this one, on one thread as each DDP process (its output captured, not a terminal)
        result = run_in_process(arguments[3:], tmp_path) if name == "one" else run_quietly(arguments, tmp_path)
        assert "5 inverted, 0 skipped (already done), 0 failed" in result.stdout
        # standard error is a pipe, as a batch job's log file: timed lines, the last one all ranks' true count
        assert_log_progress(result.stderr, 5, time.monotonic() - started)
    report = json.loads((tmp_path / "two" / "report.json").read_text())["images"]
    assert sorted(row["id"] for row in report) == [f"img{i}" for i in range(5)]
    stopped_early = 0
    for i in range(5):
        a = nti.Inversion.load(tmp_path / "one" / f"img{i}.safetensors")
        b = nti.Inversion.load(tmp_path / "two" / f"img{i}.safetensors")
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]
        stopped_early += sum(n < 3 for n in a.metadata["inner_iterations"])
        torch.testing.assert_close(a.null_embeddings, b.null_embeddings, rtol=0, atol=5e-3)
    assert stopped_early > 0  # the slots really moved at their own pace
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events
