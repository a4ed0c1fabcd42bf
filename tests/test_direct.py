"""Direct Inversion (`method="direct"`): the package against a plain loop after PnPInversion's
code (tests/reference.py), batches against singles, and its source branch retracing the pivot."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from reference import ReferenceNullInversion

import nti_lightning as nti
from nti_lightning.api import reconstruction_latents
from nti_lightning.data.images import prepare
from nti_lightning.editing.edit import edit_latents

T = 6
PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def direct(pipe, images, prompts, **options):
    return nti.invert(pipe, images, prompts, num_inference_steps=T, num_inner_steps=3, method="direct",
                      progress_bar=False, **options)


def test_offsets_and_samples_match_the_reference_loop(independent_pipeline):
    reference = ReferenceNullInversion(independent_pipeline, num_ddim_steps=T)
    expected = reference.direct_inversion(prepare(random_image(0), 16)[None], PROMPTS[0])
    [result] = direct(independent_pipeline, random_image(0), PROMPTS[0])
    assert result.metadata["method"] == "direct" and result.metadata["inner_iterations"] == [0] * T
    torch.testing.assert_close(result.z_T, expected["z_T"], rtol=1e-5, atol=1e-6)
    # The reference goes on from `step + offset`, the package from the pivot itself: equal up
    # to the rounding of that sum.
    torch.testing.assert_close(result.latent_offsets, expected["offsets"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result.null_embeddings, expected["null_embeddings"], rtol=0, atol=0)
    # sampling: the source row retraces the pivot to z0, an edit row is a plain guided sample
    prompts = [PROMPTS[0], "a blue circle"]
    ours = edit_latents(independent_pipeline, result, prompts)
    theirs = reference.sample_direct(expected["z_T"], expected["null_embeddings"], expected["offsets"], prompts)
    # A random UNet at w = 7.5 amplifies float rounding from step to step: relative measures.
    assert relative(ours, theirs) < 1e-4
    # Back to z0 up to that amplified rounding (a two-prompt batch rounds unlike the offsets'
    # one-prompt steps; 6e-4 measured), in the reference loop as in the package.
    for latents in (ours, theirs):
        assert relative(latents[0], result.source_latent) < 1e-2


@pytest.mark.parametrize("scheduling", ["continuous", "lockstep"])
def test_batch_gives_each_image_its_single_result(independent_pipeline, scheduling):
    images = [random_image(seed) for seed in range(3)]
    together = direct(independent_pipeline, images, PROMPTS, batch_size=2, scheduling=scheduling)
    for image, prompt, batched in zip(images, PROMPTS, together):
        [alone] = direct(independent_pipeline, image, prompt, batch_size=1)
        torch.testing.assert_close(batched.z_T, alone.z_T, rtol=1e-5, atol=1e-6)
        # batched kernels round differently from single ones
        assert relative(batched.latent_offsets, alone.latent_offsets) < 1e-4


def test_source_branch_reconstructs_like_the_vae_round_trip(tmp_path):
    """On the shapes model: the reconstruction is the VAE round trip, where DDIM's is far from it."""
    pipe = nti.load_pipeline("shapes")
    image, prompt = "configs/images/demo_red_circle.png", "a red circle on a green background"
    [inversion] = nti.invert(pipe, image, prompt, num_inference_steps=20, method="direct", progress_bar=False,
                             output_dir=str(tmp_path))
    loaded = nti.Inversion.load(tmp_path / "demo_red_circle.safetensors")
    assert torch.equal(loaded.latent_offsets, inversion.latent_offsets)
    metrics = loaded.metadata["metrics"]
    assert abs(metrics["psnr"] - metrics["vae_psnr"]) < 0.01 and metrics["ddim_psnr"] < metrics["vae_psnr"] - 5
    torch.testing.assert_close(reconstruction_latents(pipe, loaded)[0], loaded.source_latent, rtol=0, atol=1e-3)
    # Prompt-to-Prompt on top: the source row still lands on z0, the edit row moves
    prompts = [prompt, "a blue circle on a green background"]
    controller = nti.Replace(prompts, pipe.tokenizer, cross_replace_steps=0.8, self_replace_steps=0.6)
    latents = edit_latents(pipe, loaded, prompts, controller=controller)
    torch.testing.assert_close(latents[0], loaded.source_latent, rtol=0, atol=1e-3)
    assert float((latents[1] - latents[0]).abs().max()) > 0.1
    # a prompt swap has no source row: the offsets are not used, DDIM's sample comes out
    swapped = reconstruction_latents(pipe, loaded, prompt=prompts[1])
    # The same pivot without the offsets is a DDIM inversion (a file claiming Direct without them is refused).
    plain = nti.Inversion(loaded.z_T, loaded.null_embeddings, loaded.source_latent, prompt,
                          {**loaded.metadata, "method": "ddim"})
    assert torch.equal(swapped, reconstruction_latents(pipe, plain, prompt=prompts[1]))
