"""`edit` end to end on tiny models: reconstruction, control, determinism, the authors' reference, bad input."""

from __future__ import annotations

import numpy as np
import p2p_reference as ref
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from nti_lightning import ArtifactError, Inversion, invert, load_pipeline, reconstruct
from nti_lightning.api import reconstruction_latents
from nti_lightning.diffusion.ddim import ddim_scheduler
from nti_lightning.editing import (
    AttentionStore,
    ControlledAttnProcessor,
    LocalBlend,
    Refine,
    Replace,
    Reweight,
    cross_attention_picture,
    edit,
    edit_latents,
    token_attention_maps,
)
from nti_lightning.models.text import encode_prompts

SOURCE = "a cat sitting on a sofa"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def inversion(pipe) -> Inversion:
    """A real null-text inversion (5 steps, 2 inner iterations) of a seeded picture."""
    pixels = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    return invert(pipe, Image.fromarray(pixels), SOURCE, num_inference_steps=5, num_inner_steps=2)[0]


@pytest.fixture(scope="module")
def random_inversion(pipe) -> Inversion:
    """An inversion of the right shapes made of noise (T = 6): enough to compare samplers."""
    generator = torch.Generator().manual_seed(1)
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    return Inversion(
        z_T=torch.randn(4, 8, 8, generator=generator),
        null_embeddings=empty.expand(STEPS, -1, -1) + 0.1 * torch.randn(STEPS, 77, 32, generator=generator),
        source_latent=torch.randn(4, 8, 8, generator=generator),
        prompt=SOURCE,
        metadata={"num_inference_steps": STEPS, "guidance_scale": 7.5, "id": "noise"},
    )


def test_source_prompt_without_control_is_the_reconstruction(pipe, inversion):
    assert torch.equal(edit_latents(pipe, inversion, [SOURCE]), reconstruction_latents(pipe, inversion))
    (image,) = edit(pipe, inversion, SOURCE)
    assert np.array_equal(np.asarray(image), np.asarray(reconstruct(pipe, inversion)))


def test_plain_swap_samples_each_prompt_from_the_same_noise(pipe, inversion):
    latents = edit_latents(pipe, inversion, [SOURCE, "a dog sitting on a sofa"])
    alone = edit_latents(pipe, inversion, ["a dog sitting on a sofa"])
    # Same maths as alone; only the batch size changes the float rounding.
    assert torch.allclose(latents[0], reconstruction_latents(pipe, inversion)[0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(latents[1], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents[0], latents[1], atol=1e-2)


def test_replace_differs_from_a_plain_swap_and_from_the_source(pipe, inversion):
    prompts = [SOURCE, "a dog sitting on a sofa"]
    controlled = edit_latents(pipe, inversion, prompts, controller=Replace(prompts, pipe.tokenizer, 1.0, 0.4))
    swapped = edit_latents(pipe, inversion, prompts)
    assert (controlled[1] - swapped[1]).abs().max() > 1e-3
    assert (controlled[1] - controlled[0]).abs().max() > 1e-3
    # Only the edit prompt is controlled: the source row stays the reconstruction.
    assert torch.allclose(controlled[0], reconstruction_latents(pipe, inversion)[0], rtol=1e-4, atol=1e-4)
    images = edit(pipe, inversion, prompts, controller=Replace(prompts, pipe.tokenizer, 1.0, 0.4))
    assert len(images) == 2 and images[1].size == (32, 32)


def test_edits_are_deterministic_and_controllers_reusable(pipe, inversion):
    prompts = [SOURCE, "a dog sitting on a sofa"]
    blend = LocalBlend(prompts, pipe.tokenizer, ["cat", "dog"])
    controller = Replace(prompts, pipe.tokenizer, local_blend=blend)
    first = edit_latents(pipe, inversion, prompts, controller=controller)
    again = edit_latents(pipe, inversion, prompts, controller=controller)
    fresh = edit_latents(pipe, inversion, prompts, controller=Replace(prompts, pipe.tokenizer, local_blend=blend))
    assert torch.equal(first, again) and torch.equal(first, fresh)


class FailingReplace(Replace):
    def end_step(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        if step == 2:
            raise RuntimeError("interrupted at step 2")
        return super().end_step(step, timestep, latents)


def test_processors_restored_after_edit_and_after_an_error(pipe, inversion):
    before = pipe.unet.attn_processors
    prompts = [SOURCE, "a dog sitting on a sofa"]
    edit_latents(pipe, inversion, prompts, controller=Replace(prompts, pipe.tokenizer))
    assert all(pipe.unet.attn_processors[name] is before[name] for name in before)
    with pytest.raises(RuntimeError, match="interrupted at step 2"):
        edit_latents(pipe, inversion, prompts, controller=FailingReplace(prompts, pipe.tokenizer))
    assert not any(isinstance(p, ControlledAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert all(pipe.unet.attn_processors[name] is before[name] for name in before)


def reference_pair(kind: str, tokenizer, num_steps: int):
    """One edit as our controller and as the reference's (authors' code)."""
    if kind == "replace":
        prompts = [SOURCE, "a hippopotamus sitting on a sofa"]
        steps = {"default_": 0.8, "hippopotamus": 0.4}
        return prompts, Replace(prompts, tokenizer, steps, 0.5), ref.AttentionReplace(
            prompts, num_steps, dict(steps), 0.5, tokenizer
        )
    if kind == "refine":
        prompts = [SOURCE, "a fluffy cat sitting on a red sofa"]
        ours = Refine(prompts, tokenizer, 0.6, 0.4)
        return prompts, ours, ref.AttentionRefine(prompts, num_steps, 0.6, 0.4, tokenizer)
    if kind == "reweight":
        prompts = [SOURCE, SOURCE]
        equalizer = ref.get_equalizer(SOURCE, ("cat",), (4.0,), tokenizer)
        return prompts, Reweight(prompts, tokenizer, {"cat": 4.0}, None, 0.8, 0.4), ref.AttentionReweight(
            prompts, num_steps, 0.8, 0.4, equalizer, tokenizer
        )
    prompts = [SOURCE, "a dog sitting on a sofa"]  # replace with a local blend
    # The tiny model's maps are nearly flat: a high threshold gives a mask of part of the image.
    ours_blend = LocalBlend(prompts, tokenizer, ["cat", "dog"], threshold=0.96)
    ref_blend = ref.LocalBlend(prompts, ["cat", "dog"], tokenizer, num_steps, threshold=0.96)
    return prompts, Replace(prompts, tokenizer, 0.8, 0.4, ours_blend), ref.AttentionReplace(
        prompts, num_steps, 0.8, 0.4, tokenizer, local_blend=ref_blend
    )


@pytest.mark.parametrize("kind", ["replace", "refine", "reweight", "replace_blend"])
def test_edit_agrees_with_the_authors_code(pipe, random_inversion, kind):
    prompts, ours, theirs = reference_pair(kind, pipe.tokenizer, STEPS)
    expected = ref.reference_edit(pipe, random_inversion, prompts, theirs)
    latents = edit_latents(pipe, random_inversion, prompts, controller=ours)
    assert torch.allclose(latents, expected, atol=1e-5), (latents - expected).abs().max()
    plain = edit_latents(pipe, random_inversion, prompts)
    assert (latents[1] - plain[1]).abs().max() > 1e-3  # the control did something
    if ours.local_blend is not None:
        assert 0.1 < ours.local_blend.mask(ours.store, (8, 8))[1].float().mean() < 0.9


class HalvedReplace(Replace):
    """A user's controller: Replace with the mapped maps halved (its own `replace_cross`, no form)."""

    def replace_cross(self, base, edits):
        return 0.5 * super().replace_cross(base, edits)


class RefHalvedReplace(ref.AttentionReplace):
    """The same controller in the authors' code."""

    def replace_cross_attention(self, attn_base, att_replace):
        return 0.5 * super().replace_cross_attention(attn_base, att_replace)


def test_one_edit_runs_on_the_batched_control_and_a_users_kind_on_its_own_calls(pipe, random_inversion, monkeypatch):
    from nti_lightning.editing import AttentionController
    from nti_lightning.editing.batched_control import BatchedControl

    editors, calls = [], []
    of, own_call = BatchedControl.of.__func__, AttentionController.__call__

    def spying_of(cls, rows):
        editors.append(of(cls, rows))
        return editors[-1]

    def counting_call(self, probs, layer):  # the per-controller path's attention hook
        calls.append(type(self))
        return own_call(self, probs, layer)

    monkeypatch.setattr(BatchedControl, "of", classmethod(spying_of))
    monkeypatch.setattr(AttentionController, "__call__", counting_call)
    prompts = [SOURCE, "a hippopotamus sitting on a sofa"]
    blend = LocalBlend(prompts, pipe.tokenizer, ["cat", "hippopotamus"], threshold=0.96)
    # a built-in controller alone: the batched control edits it, no controller call is made
    replace = Replace(prompts, pipe.tokenizer, 0.8, 0.4, blend)
    built_in = edit_latents(pipe, random_inversion, prompts, controller=replace)
    [editor] = editors
    assert isinstance(editor, BatchedControl) and editor.step == STEPS and calls == []
    # a user's subclass: BatchedControl declines it, its own calls run, and it edits as the authors' code does
    editors.clear()
    ours = HalvedReplace(prompts, pipe.tokenizer, 0.8, 0.4, blend)
    latents = edit_latents(pipe, random_inversion, prompts, controller=ours)
    assert editors == [None] and len(calls) > 0 and set(calls) == {HalvedReplace} and ours.step == STEPS
    ref_blend = ref.LocalBlend(prompts, ["cat", "hippopotamus"], pipe.tokenizer, STEPS, threshold=0.96)
    theirs = RefHalvedReplace(prompts, STEPS, 0.8, 0.4, pipe.tokenizer, local_blend=ref_blend)
    expected = ref.reference_edit(pipe, random_inversion, prompts, theirs)
    assert torch.allclose(latents, expected, atol=1e-5), (latents - expected).abs().max()
    assert (latents[1] - built_in[1]).abs().max() > 1e-3  # its own replace_cross was used


@pytest.fixture(scope="module")
def sd2_shaped(pipe):
    """The tiny pipeline with an SD 2.x-shaped UNet: heads per block, linear projections, v-prediction."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8),  # SD 2.x: 5, 10, 20, 20 heads
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ).eval()
    scheduler = ddim_scheduler({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    sd2 = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler})
    generator = torch.Generator().manual_seed(2)
    inversion = Inversion(
        z_T=torch.randn(4, 16, 16, generator=generator),
        null_embeddings=encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand(STEPS, -1, -1).clone(),
        source_latent=torch.zeros(4, 16, 16),
        prompt=SOURCE,
        metadata={"num_inference_steps": STEPS, "scheduler_config": {"prediction_type": "v_prediction"}},
    )
    return sd2, inversion


def test_any_sd_unet_works_and_agrees_with_the_authors_code(sd2_shaped):
    sd2, inversion = sd2_shaped
    prompts = [SOURCE, "a dog sitting on a sofa"]
    ours = Replace(prompts, sd2.tokenizer, 0.8, 0.4, LocalBlend(prompts, sd2.tokenizer, ["cat", "dog"], threshold=0.9))
    ref_blend = ref.LocalBlend(prompts, ["cat", "dog"], sd2.tokenizer, STEPS, threshold=0.9)
    theirs = ref.AttentionReplace(prompts, STEPS, 0.8, 0.4, sd2.tokenizer, local_blend=ref_blend)
    latents = edit_latents(sd2, inversion, prompts, controller=ours)
    expected = ref.reference_edit(sd2, inversion, prompts, theirs)
    assert torch.allclose(latents, expected, atol=1e-5), (latents - expected).abs().max()
    assert ours.store.resolutions() == [8, 16]  # LocalBlend reads the coarsest: 8x8 (16x16 in SD 1.x at 512 px)
    assert 0.1 < ours.local_blend.mask(ours.store, (16, 16))[1].float().mean() < 0.9
    assert (latents[1] - edit_latents(sd2, inversion, prompts)[1]).abs().max() > 1e-3


def test_attention_store_and_pictures(pipe, random_inversion):
    store = AttentionStore()
    prompts = [SOURCE, "a hippopotamus sitting on a sofa"]
    edit_latents(pipe, random_inversion, prompts, attention_store=store)
    assert store.num_steps == STEPS and store.resolutions() == [8]  # the tiny model's down/up maps
    labels, maps = token_attention_maps(store, pipe.tokenizer, prompts[1], prompt_index=1)
    assert labels == ["a", "hippo", "potam", "us", "sitting", "on", "a", "sofa"]
    assert maps.shape == (8, 8, 8) and bool((maps > 0).all())
    averaged = store.maps(8)[1]  # [8, 8, 77]: rows of every map sum to 1 over the 77 tokens
    assert torch.allclose(averaged.sum(-1), torch.ones(8, 8), atol=1e-5)
    picture = cross_attention_picture(store, pipe.tokenizer, prompts[0])
    assert picture.size[0] > 6 * 128 and picture.size[1] > 128
    with pytest.raises(ValueError, match="no down/up cross-attention maps"):
        token_attention_maps(AttentionStore(), pipe.tokenizer, SOURCE)


def with_tensors(inversion: Inversion, **changes) -> Inversion:
    fields = {k: getattr(inversion, k) for k in ("z_T", "null_embeddings", "source_latent", "prompt")}
    return Inversion(**{**fields, **changes}, metadata={**inversion.metadata, **changes.pop("metadata", {})})


def test_inversions_of_another_model_are_refused_by_name(pipe, random_inversion):
    wrong_latent = with_tensors(random_inversion, z_T=torch.zeros(4, 16, 16), source_latent=torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match=r"noise: latent z_T \(4, 16, 16\) does not match this model's \(4, 8, 8\)"):
        edit(pipe, wrong_latent, [SOURCE])
    wrong_width = with_tensors(random_inversion, null_embeddings=torch.zeros(STEPS, 77, 768))
    with pytest.raises(ValueError, match=r"null embeddings \(6, 77, 768\) should be \[T, 77, 32\]"):
        edit(pipe, wrong_width, [SOURCE])
    wrong_steps = with_tensors(random_inversion)
    wrong_steps.metadata["num_inference_steps"] = 50
    with pytest.raises(ValueError, match="6 null embeddings for num_inference_steps=50"):
        edit(pipe, wrong_steps, [SOURCE])
    v_model = with_tensors(random_inversion)
    v_model.metadata["scheduler_config"] = {"prediction_type": "v_prediction"}
    with pytest.raises(ValueError, match="inverted with a 'v_prediction' model"):
        edit(pipe, v_model, [SOURCE])


def test_truncated_artifact_is_named(random_inversion, tmp_path):
    path = random_inversion.save(tmp_path / "cat.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="cat.safetensors"):
        Inversion.load(path)


def test_prompts_must_fit_the_controller_and_the_source(pipe, random_inversion):
    prompts = [SOURCE, "a dog sitting on a sofa"]
    controller = Replace(prompts, pipe.tokenizer)
    with pytest.raises(ValueError, match="controller was built for prompts"):
        edit(pipe, random_inversion, [SOURCE, "a cow sitting on a sofa"], controller=controller)
    other = ["a cow sitting on a sofa", "a dog sitting on a sofa"]
    with pytest.raises(ValueError, match="must be the inversion's source prompt"):
        edit(pipe, random_inversion, other, controller=Replace(other, pipe.tokenizer))
    with pytest.raises(ValueError, match="'a cat sitting on a sofa' has 6 and 'a big dog sitting on a sofa' has 7"):
        Replace([SOURCE, "a big dog sitting on a sofa"], pipe.tokenizer)
    with pytest.raises(ValueError, match="word 'tiger' is not in prompt 'a dog sitting on a sofa'"):
        LocalBlend(prompts, pipe.tokenizer, [["cat"], ["tiger"]])
