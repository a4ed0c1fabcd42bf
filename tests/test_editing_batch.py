"""Edits batched across inversions (`edit_jobs_latents`, `nti predict --data.batch_size`): each
job's result equals its edit alone, whatever else shares the UNet calls."""

from __future__ import annotations

import pytest
import torch

from nti_lightning import Inversion, load_pipeline
from nti_lightning.editing import LocalBlend, Refine, Replace, Reweight
from nti_lightning.editing.attention import AttentionStore
from nti_lightning.editing.batched_control import BatchedControl
from nti_lightning.editing.edit import EditJob, edit_jobs_latents, edit_latents
from nti_lightning.editing.editor import EditRows, editor_for
from nti_lightning.models.text import PromptEncoder

STEPS = 6


def noise_inversion(pipe, seed: int, prompt: str, offsets: bool = False) -> Inversion:
    """An inversion of the right shapes made of noise (per-step nulls near ∅)."""
    generator = torch.Generator().manual_seed(seed)
    empty = PromptEncoder.of(pipe).null()
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    metadata = {"num_inference_steps": STEPS, "guidance_scale": 7.5}
    pooled = None
    if empty.has_pooled:
        metadata["time_ids"] = [float(v) for v in empty.time_ids[0].tolist()]
        pooled = empty.pooled.expand(STEPS, -1) + 0.1 * torch.randn(STEPS, empty.pooled.shape[1], generator=generator)
    return Inversion(
        z_T=torch.randn(*shape, generator=generator),
        null_embeddings=empty.embeddings.expand(STEPS, -1, -1)
        + 0.1 * torch.randn(STEPS, *empty.embeddings.shape[1:], generator=generator),
        source_latent=torch.randn(*shape, generator=generator),
        prompt=prompt,
        metadata=metadata,
        null_pooled_embeddings=pooled,
        latent_offsets=0.05 * torch.randn(STEPS, *shape, generator=generator) if offsets else None,
    )


def jobs_for(pipe) -> list[EditJob]:
    """Six edits of four inversions: Replace with LocalBlend, Refine, Reweight on Refine (Direct
    Inversion's offsets), a plain swap, Replace with two edit prompts (one word split into three
    tokens) and its own blend start, and a reconstruction recording its maps."""
    tokenizer = pipe.tokenizer
    cat, dog, room, bird = (
        noise_inversion(pipe, 1, "a cat sitting on a sofa"),
        noise_inversion(pipe, 2, "a dog in a room"),
        noise_inversion(pipe, 3, "a red room", offsets=True),
        noise_inversion(pipe, 4, "a bird"),
    )
    swap = ["a cat sitting on a sofa", "a tiger sitting on a sofa"]
    blend = LocalBlend(swap, tokenizer, [["cat"], ["tiger"]], start=0.3)
    refine = ["a dog in a room", "a small dog in a big room"]
    reweight = ["a red room", "a red and blue room"]
    three = ["a cat sitting on a sofa", "a capybara sitting on a sofa", "a dog sitting on a sofa"]
    return [
        EditJob(
            cat, swap, Replace(swap, tokenizer, cross_replace_steps=0.8, self_replace_steps=0.5, local_blend=blend)
        ),
        EditJob(dog, refine, Refine(refine, tokenizer, cross_replace_steps=0.6, self_replace_steps=0.3)),
        EditJob(room, reweight, Reweight(reweight, tokenizer, words={"blue": 2.0}, base=Refine(reweight, tokenizer))),
        EditJob(bird, ["a bird", "a plane"]),
        EditJob(
            cat,
            three,
            Replace(
                three,
                tokenizer,
                cross_replace_steps={"default_": 0.9, "capybara": 0.5},
                self_replace_steps=(0.2, 0.7),
                local_blend=LocalBlend(three, tokenizer, [["cat"], ["capybara"], ["dog"]], start=0.5),
            ),
        ),
        EditJob(cat, ["a cat sitting on a sofa"], attention_store=AttentionStore()),
    ]


def batched_control(jobs: list[EditJob]):
    """`BatchedControl.of` the jobs' controllers, begun as `edit_jobs_latents` begins them."""
    stores = [job.controller.begin(STEPS).store if job.controller else job.attention_store for job in jobs]
    rows = EditRows([len(job.prompts) for job in jobs], [job.controller for job in jobs], stores, STEPS)
    return BatchedControl.of(rows)


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_jobs_together_equal_each_alone(model):
    pipe = load_pipeline(model)
    jobs = jobs_for(pipe)
    # the built-in controllers run as whole-batch operations (one split word: one general mapper row)
    assert batched_control(jobs).forms.general_rows.tolist() == [3]
    together = edit_jobs_latents(pipe, jobs)
    recorded = jobs[-1].attention_store
    for job, latents in zip(jobs_for(pipe), together):
        alone = edit_latents(
            pipe, job.inversion, job.prompts, controller=job.controller, attention_store=job.attention_store
        )
        assert latents.shape == alone.shape
        # The rounding of a larger batch: at most 3.4e-5 measured (SD and SDXL); 5e-4 leaves a factor
        # over 10 for other CPUs' kernels and stays far below the 1e-3 effect checked below.
        torch.testing.assert_close(latents, alone, rtol=0, atol=5e-4)
    # the store of the fifth job saw its own rows' maps, as alone
    side = recorded.resolutions()[0]
    torch.testing.assert_close(recorded.maps(side), job.attention_store.maps(side), rtol=0, atol=1e-5)
    # the controllers did something, each to its own rows only
    plain = edit_jobs_latents(pipe, [EditJob(job.inversion, job.prompts) for job in jobs_for(pipe)])
    assert all(
        float((a[1:] - b[1:]).abs().max()) > 1e-3 for a, b in zip(together[:3] + together[4:5], plain[:3] + plain[4:5])
    )
    torch.testing.assert_close(together[3], plain[3], rtol=0, atol=5e-4)


class SwappedReplace(Replace):
    """A user's controller: Replace with the edit's own maps swapped in (its `replace_cross` only)."""

    def replace_cross(self, base, edits):
        return 0.5 * (super().replace_cross(base, edits) + edits)


def test_a_controller_of_its_own_kind_runs_on_its_own_rows():
    pipe = load_pipeline("tiny")
    swap = ["a cat sitting on a sofa", "a tiger sitting on a sofa"]
    own = SwappedReplace(swap, pipe.tokenizer, local_blend=LocalBlend(swap, pipe.tokenizer, [["cat"], ["tiger"]]))
    jobs = [EditJob(noise_inversion(pipe, 1, swap[0]), swap, own), *jobs_for(pipe)[1:3]]
    assert batched_control(jobs) is None  # its replace_cross has no form
    assert batched_control(jobs[1:]) is not None
    together = edit_jobs_latents(pipe, jobs)
    for job, latents in zip(jobs, together):
        alone = edit_latents(pipe, job.inversion, job.prompts, controller=job.controller)
        torch.testing.assert_close(latents, alone, rtol=0, atol=5e-4)
    plain = edit_latents(
        pipe, jobs[0].inversion, swap, controller=Replace(swap, pipe.tokenizer, local_blend=own.local_blend)
    )
    assert float((together[0][1] - plain[1]).abs().max()) > 1e-3  # its own replace_cross was used


def test_edit_rows_name_each_jobs_source_and_targets():
    rows = EditRows([2, 1, 3], ["settings", None, "settings"], [None, None, AttentionStore()], STEPS)
    assert rows.rows == 6 and rows.spans == [(0, 2), (2, 3), (3, 6)]
    assert rows.source_row().tolist() == [0, 0, 2, 3, 3, 3]  # a job without settings: each row its own
    assert rows.target_rows().tolist() == [1, 4, 5]
    # settings no editor knows: refused by name rather than sampled unedited
    with pytest.raises(ValueError, match=r"no editor edits a batch of \['str'\]"):
        editor_for(rows, [BatchedControl])
    with pytest.raises(ValueError, match="one size, settings and store per job"):
        EditRows([2], [None, None], [None], STEPS)


def test_a_batch_needs_one_number_of_steps():
    pipe = load_pipeline("tiny")
    short = noise_inversion(pipe, 5, "a bird")
    short.null_embeddings, short.metadata = short.null_embeddings[:4], {**short.metadata, "num_inference_steps": 4}
    with pytest.raises(ValueError, match=r"one number of steps, got \[4, 6\]"):
        edit_jobs_latents(pipe, [EditJob(short, ["a bird"]), EditJob(noise_inversion(pipe, 6, "a bird"), ["a bird"])])


def test_predict_batches_give_the_one_at_a_time_pictures(tmp_path, monkeypatch):
    import json
    import sys

    import numpy as np
    from conftest import ROOT
    from PIL import Image

    from nti_lightning.editing.cli import main as predict_main

    monkeypatch.setattr(sys, "argv", ["nti"])
    pipe = load_pipeline("tiny")
    prompts = ["a cat sitting on a sofa", "a dog in a room", "a red room"]
    for seed, prompt in enumerate(prompts):
        inversion = noise_inversion(pipe, seed, prompt, offsets=seed == 2)
        inversion.save(tmp_path / f"inv{seed}.safetensors")
    specs = [
        {"artifact": str(tmp_path / "inv0.safetensors"), "prompts": ["a tiger sitting on a sofa"], "id": "tiger",
         "options": {"blend_words": [["cat"], ["tiger"]]}},
        {"artifact": str(tmp_path / "inv1.safetensors"), "prompts": ["a small dog in a big room"], "kind": "refine"},
        {"artifact": str(tmp_path / "missing.safetensors"), "prompts": ["a dog"], "id": "missing"},
        {"artifact": str(tmp_path / "inv2.safetensors"), "prompts": ["a red and blue room"], "kind": "reweight",
         "options": {"words": {"blue": 2.0}, "base": "refine"}},
    ]
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(spec) + "\n" for spec in specs))
    # batches of 1 and 4, and of 4 with the UNet's weights channels-last (another rounding only)
    for name, batch_size, layout in (("b1", 1, "false"), ("b4", 4, "false"), ("b4cl", 4, "true")):
        predict_main(
            [
                "predict",
                "--config",
                str(ROOT / "tests/configs/edit_tiny.yaml"),
                "--trainer.logger",
                "false",
                "--data.edits_file",
                str(edits),
                "--data.batch_size",
                str(batch_size),
                "--model.channels_last",
                layout,
                "--writer.output_dir",
                str(tmp_path / name),
            ]
        )
    pictures = sorted(p.name for p in (tmp_path / "b1").glob("*_edit*.png"))
    assert pictures == ["inv1_refine_edit1.png", "inv2_reweight_edit1.png", "tiger_edit1.png"]
    for b in ("b4", "b4cl"):
        assert sorted(p.name for p in (tmp_path / b).glob("*_edit*.png")) == pictures
        for name in pictures:
            one, four = (np.asarray(Image.open(tmp_path / folder / name), dtype=np.int16) for folder in ("b1", b))
            assert np.abs(one - four).max() <= 1, (b, name)  # a level at most: the rounding of a larger batch
    for b in (1, 4):  # the broken spec fails alone
        [failure] = (tmp_path / f"b{b}" / "failures.jsonl").read_text().splitlines()
        assert json.loads(failure)["id"] == "missing"


def test_channels_last_puts_the_unets_weights_in_that_layout():
    from nti_lightning.editing.module import EditModule

    module = EditModule(pretrained="tiny", channels_last=True)
    module.configure_model()
    weight = module.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    plain = EditModule(pretrained="tiny")
    plain.configure_model()
    assert plain.unet.conv_in.weight.is_contiguous()


def test_batched_local_blend_equals_each_blend_alone():
    # Synthetic peaked maps make partial masks (the tiny model's few steps blur them to the whole
    # image), so every part of the blend shows: words, union with the source, threshold, start.
    from nti_lightning.editing.attention import AttentionLayer

    tokenizer = load_pipeline("tiny").tokenizer
    swap = ["a cat sitting on a sofa", "a tiger sitting on a sofa"]
    three = ["a red room", "a blue room", "a green room"]
    controllers = [
        Replace(
            swap, tokenizer, local_blend=LocalBlend(swap, tokenizer, [["cat"], ["tiger"]], threshold=0.3, start=0.0)
        ),
        Refine(["a dog", "a small dog"], tokenizer),
        Replace(
            three,
            tokenizer,
            local_blend=LocalBlend(three, tokenizer, [["room"], ["blue"], ["green", "room"]], threshold=0.5, start=0.5),
        ),
    ]
    for controller in controllers:
        controller.begin(STEPS)
    control = BatchedControl.of(EditRows([2, 2, 3], controllers, [c.store for c in controllers], STEPS))
    generator = torch.Generator().manual_seed(0)
    for layer in (AttentionLayer("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", "down", True),
                  AttentionLayer("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "up", True)):
        probs = (3 * torch.randn(7, 2, 64, 77, generator=generator)).softmax(-1)
        control.store.record(probs, layer)
        for controller, rows in zip(controllers, (slice(0, 2), slice(2, 4), slice(4, 7))):
            controller.store.record(probs[rows], layer)
    latents = torch.randn(7, 4, 8, 8, generator=generator)
    for step in (0, 2, 3):  # the first start, before and at the third edit's start
        together = control.blend(latents, step)
        alone = torch.cat([c.local_blend(latents[rows], c.store, step, STEPS) if c.local_blend else latents[rows]
                           for c, rows in zip(controllers, (slice(0, 2), slice(2, 4), slice(4, 7)))])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    masks = controllers[0].local_blend.mask(controllers[0].store, (8, 8))
    assert 0 < int(masks[1].sum()) < 64 and not torch.equal(
        masks[1], controllers[0].local_blend.mask(controllers[0].store, (8, 8))[0]
    )
    assert not torch.equal(control.blend(latents, 4)[4:], latents[4:])
