"""Sanity checks of the independent SDXL references (tests/reference_xl.py, `reference_edit_xl`)."""

from types import SimpleNamespace

import p2p_reference as ref
import pytest
import torch
from conftest import random_image
from reference_xl import ReferenceNullInversionXL

from nti_lightning.data.images import prepare

T, N = 8, 5
SOURCE, EDIT = "a blue square", "a red square"


def pixels(seed: int) -> torch.Tensor:
    return prepare(random_image(seed), 16)[None]


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models gain nothing from a second thread, and a two-thread pool on a shared,
    busy machine can run many times slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(independent_xl_pipeline):
    return ReferenceNullInversionXL(independent_xl_pipeline, num_ddim_steps=T)


@pytest.fixture(scope="module")
def inverted(reference):
    return reference.invert(pixels(2), SOURCE, num_inner_steps=N, epsilon=1e-5)


def test_pipeline_is_sdxl_shaped(independent_xl_pipeline):
    pipe = independent_xl_pipeline
    ids = pipe.tokenizer_2([SOURCE], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert ids[0] == 49406 and ids[4] == 49407 and (ids[5:] == 0).all()  # "!" padding, as SDXL's
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(SOURCE, device="cpu", do_classifier_free_guidance=True)
    assert cond.shape == (1, 77, 16 + 24) and pooled.shape == (1, 20)
    assert not uncond.any() and not uncond_pooled.any()  # force_zeros_for_empty_prompt


def test_null_text_beats_plain_ddim_at_guidance(reference, inverted):
    out = inverted
    assert out["z_T"].shape == (4, 8, 8) and out["pivot"].shape == (T + 1, 4, 8, 8)
    assert out["null_embeddings"].shape == (T, 77, 40) and out["null_pooled_embeddings"].shape == (T, 20)
    assert out["time_ids"] == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    assert out["inner_iterations"] == [N] * T
    # the pooled nulls were tuned too: every step's pair moved away from the zero start
    assert (out["null_pooled_embeddings"].abs().amax(dim=1) > 1e-3).all()
    assert (out["null_embeddings"].abs().amax(dim=(1, 2)) > 1e-3).all()
    # the sampling loop with the stored nulls reproduces the optimisation's own advance
    sample = reference.reconstruct(out["z_T"], out["null_embeddings"], out["null_pooled_embeddings"], SOURCE)
    torch.testing.assert_close(sample, out["reconstruction"], rtol=1e-4, atol=1e-4)
    zeros = (torch.zeros_like(out["null_embeddings"]), torch.zeros_like(out["null_pooled_embeddings"]))
    plain = reference.reconstruct(out["z_T"], *zeros, SOURCE, guidance_scale=7.5)
    target = out["source_latent"][None]
    assert mse(sample, target) < 0.5 * mse(plain, target), (mse(sample, target), mse(plain, target))


def test_huge_epsilon_stops_every_step_after_one_iteration(reference):
    out = reference.invert(pixels(2), SOURCE, num_inner_steps=N, epsilon=1e9)
    assert out["inner_iterations"] == [1] * T


def as_inversion(out):
    return SimpleNamespace(
        z_T=out["z_T"], null_embeddings=out["null_embeddings"],
        null_pooled_embeddings=out["null_pooled_embeddings"], num_inference_steps=T,
    )


def test_reference_edit_xl_without_control_is_plain_sampling(independent_xl_pipeline, reference, inverted):
    pipe, prompts = independent_xl_pipeline, [SOURCE, EDIT]
    controller = ref.AttentionReplace(prompts, T, 0.0, 0.0, pipe.tokenizer)
    latents = ref.reference_edit_xl(pipe, as_inversion(inverted), prompts, controller)
    assert latents.shape == (2, 4, 8, 8)
    for row, prompt in enumerate(prompts):
        plain = reference.reconstruct(
            inverted["z_T"], inverted["null_embeddings"], inverted["null_pooled_embeddings"], prompt
        )
        torch.testing.assert_close(latents[row : row + 1], plain, rtol=1e-4, atol=1e-4)
    assert controller.cur_step == T  # every attention layer went through the controller


def test_reference_edit_xl_replace_changes_the_edit(independent_xl_pipeline, reference, inverted):
    pipe, prompts = independent_xl_pipeline, [SOURCE, EDIT]
    controller = ref.AttentionReplace(prompts, T, 0.8, 0.4, pipe.tokenizer)
    latents = ref.reference_edit_xl(pipe, as_inversion(inverted), prompts, controller)
    nulls = (inverted["null_embeddings"], inverted["null_pooled_embeddings"])
    source = reference.reconstruct(inverted["z_T"], *nulls, SOURCE)
    edit = reference.reconstruct(inverted["z_T"], *nulls, EDIT)
    torch.testing.assert_close(latents[:1], source, rtol=1e-4, atol=1e-4)  # the source row is untouched
    assert float((latents[1:] - edit).abs().max()) > 1e-2


def test_reference_processor_is_exact_on_sdxl_attention(independent_xl_pipeline):
    """The authors' processor (no norm_cross/group_norm/residual handling) computes exactly what
    diffusers' classic `AttnProcessor` does on every attention module of the SDXL-shaped UNet."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = independent_xl_pipeline.unet
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 8, 8), 500)
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 77, 40),
        added_cond_kwargs={"text_embeds": torch.randn(2, 20), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)},
    )
    original = unet.attn_processors
    store = ref.AttentionStore()
    store.num_att_layers = len(original)
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    try:
        with torch.no_grad():
            unet.set_attn_processor(AttnProcessor())
            expected = unet(*args, **kwargs).sample
            unet.set_attn_processor(
                {name: ref.ReferenceAttnProcessor(store, places[name.split(".")[0]]) for name in original}
            )
            got = unet(*args, **kwargs).sample
    finally:
        unet.set_attn_processor(dict(original))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert store.cur_step == 1 and len(store.attention_store["down_cross"]) > 0
