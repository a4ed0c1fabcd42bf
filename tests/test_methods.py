"""Inversion methods are objects behind one interface (`nti_lightning.inversion.methods`).

A method decides where each step's null condition starts, whether it is optimised, where the walk
goes on after a step and what an edit's source branch adds; both schedules ask it and nothing
else. A method registered from outside the package runs through `invert` under both schedules.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_image

import nti_lightning as nti
from nti_lightning.errors import OptionError
from nti_lightning.inversion import methods as registry
from nti_lightning.inversion.artifact import ArtifactError
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.inversion.methods import REGISTRY, InversionMethod, method_named, method_of

PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star"]


def test_the_registry_names_every_method_once_and_refuses_others():
    assert registry.METHODS == (
        "null_text", "negative_prompt", "ddim", "direct", "ddpm", "proxnpi", "edict", "pix2pix_zero"
    )
    assert [method.name for method in REGISTRY.values()] == list(registry.METHODS)
    assert [name for name, method in REGISTRY.items() if method.optimises] == ["null_text"]
    assert [name for name, method in REGISTRY.items() if method.stores_offsets] == ["direct", "ddpm"]
    with pytest.raises(OptionError, match=r"model.method must be one of .*'null_text'.*got 'nul_text'"):
        method_named("nul_text")
    with pytest.raises(OptionError, match="model.method must be one of"):
        nti.NullTextInversion(method="nul_text")


class CopyOfNegativePrompt(InversionMethod):
    """A method written outside the package: negative-prompt inversion again, under its own name."""

    name = "copied_negative_prompt"
    label = "copy"

    def start_condition(self, cond, empty):
        return cond


@pytest.mark.parametrize("scheduling", ["lockstep", "continuous"])
def test_a_method_registered_from_outside_runs_under_both_schedules(independent_pipeline, monkeypatch, scheduling):
    monkeypatch.setitem(REGISTRY, CopyOfNegativePrompt.name, CopyOfNegativePrompt())
    images = [random_image(seed) for seed in range(3)]
    options = dict(num_inference_steps=3, num_inner_steps=2, batch_size=2, scheduling=scheduling)
    copied = nti.invert(independent_pipeline, images, PROMPTS, method=CopyOfNegativePrompt.name, **options)
    original = nti.invert(independent_pipeline, images, PROMPTS, method="negative_prompt", **options)
    for a, b in zip(copied, original):
        assert a.metadata["method"] == CopyOfNegativePrompt.name and b.metadata["method"] == "negative_prompt"
        assert torch.equal(a.null_embeddings, b.null_embeddings)  # the same object's maths, bit for bit
        assert torch.equal(a.z_T, b.z_T)
    # The prompt's own condition at every step, no optimisation: no iteration, no offsets.
    assert copied[0].metadata["inner_iterations"] == [0] * 3 and copied[0].latent_offsets is None
    assert not torch.equal(copied[0].null_embeddings[0], copied[1].null_embeddings[0])


def test_an_artifact_says_which_method_made_it_and_an_unknown_one_is_refused(independent_pipeline):
    [direct] = nti.invert(independent_pipeline, random_image(0), PROMPTS[0], method="direct", num_inference_steps=2)
    assert method_of(direct) is REGISTRY["direct"] and direct.latent_offsets is not None
    check_compatible(independent_pipeline, direct)

    unknown = direct
    unknown.metadata["method"] = "cycle_diffusion"
    with pytest.raises(ArtifactError, match=r"cat.safetensors: made by inversion method 'cycle_diffusion', which this"):
        check_compatible(independent_pipeline, unknown, name="cat.safetensors")

    unknown.metadata["method"] = "null_text"  # a Null-text file does not carry offsets
    with pytest.raises(ValueError, match=r"made by method 'null_text', but carries latent offsets"):
        check_compatible(independent_pipeline, unknown, name="cat.safetensors")

    unknown.metadata["method"] = "direct"
    unknown.latent_offsets = None  # a Direct Inversion file without its offsets
    with pytest.raises(ValueError, match=r"made by method 'direct', but has no latent offsets"):
        check_compatible(independent_pipeline, unknown, name="cat.safetensors")

    del unknown.metadata["method"]  # built by hand: no name, no offsets -> Null-text's
    assert method_of(unknown) is REGISTRY["null_text"]
