"""The package against the plain-loop reference (tests/reference.py), and batches against singles."""

import numpy as np
import pytest
import torch
from conftest import random_image
from reference import ReferenceNullInversion, clear_stopping_epsilon

import nti_lightning as nti
from nti_lightning.api import reconstruction_latents
from nti_lightning.data.images import prepare

T, N = 8, 5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_reference(pipe, image, prompt, epsilon):
    reference = ReferenceNullInversion(pipe, num_ddim_steps=T)
    return reference.invert(prepare(image, 16)[None], prompt, num_inner_steps=N, epsilon=epsilon)


#: Every (image seed, prompt) this module inverts with `stopping_epsilon`.
STOPPING_INPUTS = [(0, "a red circle"), (1, "a blue square on a green background"), (2, "a yellow star"),
                   (1, "a blue square"), (2, "a cat")]


@pytest.fixture(scope="module")
def stopping_epsilon(independent_pipeline):
    """An ε at which some steps of image 0 stop early and others do not, clear of every loss."""
    inputs = [(prepare(random_image(seed), 16)[None], prompt) for seed, prompt in STOPPING_INPUTS]
    return clear_stopping_epsilon(ReferenceNullInversion(independent_pipeline, num_ddim_steps=T), inputs, N)


@pytest.mark.parametrize("early_stop", [False, True])
def test_invert_matches_reference(independent_pipeline, stopping_epsilon, early_stop):
    epsilon = stopping_epsilon if early_stop else 1e-5
    image, prompt = random_image(0), "a red circle"
    expected = run_reference(independent_pipeline, image, prompt, epsilon)
    [result] = nti.invert(
        independent_pipeline, image, prompt, num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=epsilon
    )
    if early_stop:
        assert 1 in expected["inner_iterations"] and N in expected["inner_iterations"]
    else:
        assert expected["inner_iterations"] == [N] * T
    assert result.metadata["inner_iterations"] == expected["inner_iterations"]
    assert relative(result.z_T, expected["z_T"]) < 1e-5
    torch.testing.assert_close(result.source_latent, expected["source_latent"], rtol=1e-5, atol=1e-6)
    assert result.null_embeddings.shape == (T, 77, 24) and result.null_embeddings.dtype == torch.float32
    assert float((result.null_embeddings - expected["null_embeddings"]).abs().max()) < 1e-3
    np.testing.assert_allclose(result.metadata["final_losses"], expected["final_losses"], rtol=1e-4)
    # reconstruction: sampling from z_T with the per-step embeddings
    latents = reconstruction_latents(independent_pipeline, result)
    assert float((latents - expected["reconstruction"]).abs().max()) < 1e-3
    reference_sample = ReferenceNullInversion(independent_pipeline, T).reconstruct(
        expected["z_T"], expected["null_embeddings"], prompt
    )
    assert float((latents - reference_sample).abs().max()) < 1e-3


def test_null_text_beats_plain_ddim_at_guidance(independent_pipeline):
    """The optimisation brings the guided reconstruction towards the source latent."""
    image, prompt = random_image(1), "a blue square"
    [result] = nti.invert(independent_pipeline, image, prompt, num_inference_steps=T, num_inner_steps=N)
    null_text = reconstruction_latents(independent_pipeline, result)
    from nti_lightning.models.text import encode_prompts

    empty = encode_prompts(independent_pipeline.tokenizer, independent_pipeline.text_encoder, [""])
    plain = nti.Inversion(result.z_T, empty.expand(T, -1, -1).clone(), result.source_latent, prompt, result.metadata)
    ddim = reconstruction_latents(independent_pipeline, plain)
    target = result.source_latent[None]
    assert (null_text - target).pow(2).mean() < 0.5 * (ddim - target).pow(2).mean()


@pytest.mark.parametrize("scheduling", ["continuous", "lockstep"])
def test_batch_gives_each_image_its_single_result(independent_pipeline, stopping_epsilon, scheduling):
    images = [random_image(seed) for seed in range(3)]
    prompts = ["a red circle", "a blue square on a green background", "a yellow star"]
    options = dict(num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=stopping_epsilon, scheduling=scheduling)
    batched = nti.invert(independent_pipeline, images, prompts, batch_size=3, **options)
    assert [b.prompt for b in batched] == prompts
    for image, prompt, together in zip(images, prompts, batched):
        [alone] = nti.invert(independent_pipeline, image, prompt, batch_size=1, **options)
        assert together.metadata["inner_iterations"] == alone.metadata["inner_iterations"]
        assert relative(together.z_T, alone.z_T) < 1e-5
        # Batched kernels round differently from single ones; Adam's normalised steps carry
        # that rounding into the embeddings: 1e-4 typically, a few 1e-3 at worst over the walk.
        assert float((together.null_embeddings - alone.null_embeddings).abs().max()) < 5e-3
        torch.testing.assert_close(
            reconstruction_latents(independent_pipeline, together),
            reconstruction_latents(independent_pipeline, alone),
            rtol=0,
            atol=1e-3,
        )
    # the three images stopped at different steps: the masks really were per image
    assert len({tuple(b.metadata["inner_iterations"]) for b in batched}) > 1


def test_stopped_image_is_frozen_while_others_continue(independent_pipeline):
    """ε huge: everything stops after its first update — one Adam step of size lr per element."""
    [result] = nti.invert(
        independent_pipeline, random_image(2), "a cat", num_inference_steps=3, num_inner_steps=4, early_stop_epsilon=1e3
    )
    assert result.metadata["inner_iterations"] == [1, 1, 1]
    from nti_lightning.models.text import encode_prompts

    empty = encode_prompts(independent_pipeline.tokenizer, independent_pipeline.text_encoder, [""])[0]
    start = torch.cat([empty[None], result.null_embeddings[:-1]])
    for step, update in enumerate((result.null_embeddings - start).abs()):
        lr = 1e-2 * (1 - step / 100)
        # one Adam step from a fresh state: lr·g/(|g|+1e-8), at most lr, about lr almost everywhere
        assert float(update.max()) <= lr * (1 + 1e-5)
        assert float(update.median()) > 0.99 * lr


def test_v_prediction_pivot_round_trip():
    """A v-prediction model: the pivot uses the documented conversion, and null-text beats plain DDIM."""
    from conftest import build_independent_pipeline

    from nti_lightning.models.text import encode_prompts

    pipe = build_independent_pipeline(seed=7, prediction_type="v_prediction")
    image, prompt = random_image(3), "a green triangle"
    [result] = nti.invert(pipe, image, prompt, num_inference_steps=T, num_inner_steps=N)
    assert result.metadata["scheduler_config"]["prediction_type"] == "v_prediction"

    # the pivot by hand: ε = sqrt(ā_t) v + sqrt(1-ā_t) x at the destination t, then the ε step
    reference = ReferenceNullInversion(pipe, T)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
    latent = result.source_latent[None]
    with torch.no_grad():
        for t in reference.scheduler.timesteps.flip(0).tolist():
            v = pipe.unet(latent, t, encoder_hidden_states=cond).sample
            alpha = reference.scheduler.alphas_cumprod[t]
            eps = alpha**0.5 * v + (1 - alpha) ** 0.5 * latent
            latent = reference.next_step(eps, t, latent)
    assert relative(result.z_T, latent[0]) < 1e-5

    # back from z_T: with the optimised embeddings closer to z0 than with ∅ (plain DDIM at w)
    target = result.source_latent[None]
    null_text = float((reconstruction_latents(pipe, result) - target).pow(2).mean())
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    plain = nti.Inversion(result.z_T, empty.expand(T, -1, -1).clone(), result.source_latent, prompt, result.metadata)
    ddim = float((reconstruction_latents(pipe, plain) - target).pow(2).mean())
    assert null_text < 0.8 * ddim


def test_speed_options_keep_the_results(independent_pipeline, stopping_epsilon):
    """The speed options change where time goes, not what comes out (lockstep scheduling; the
    continuous batching versions are in test_slots.py)."""
    images, prompts = [random_image(s) for s in (0, 1, 2)], ["a red circle", "a blue square", "a cat"]
    options = dict(num_inference_steps=T, num_inner_steps=N, early_stop_epsilon=stopping_epsilon, batch_size=3,
                   scheduling="lockstep")
    default = nti.invert(independent_pipeline, images, prompts, **options)
    # All N iterations masked per image, no host read of the stop mask: exactly the same.
    sync_free = nti.invert(independent_pipeline, images, prompts, early_exit=False, **options)
    assert any(1 in r.metadata["inner_iterations"] for r in default)  # some steps did stop early
    for a, b in zip(default, sync_free):
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]
        assert torch.equal(a.null_embeddings, b.null_embeddings) and torch.equal(a.z_T, b.z_T)
    # The step's conditional output reused for the advance, and channels-last weights: same
    # maths, float-level differences.
    fast = nti.invert(independent_pipeline, images, prompts, reuse_cond_output=True, channels_last=True, **options)
    independent_pipeline.unet.to(memory_format=torch.contiguous_format)
    for a, b in zip(default, fast):
        assert relative(b.z_T, a.z_T) < 1e-5
        assert relative(b.null_embeddings, a.null_embeddings) < 1e-2
