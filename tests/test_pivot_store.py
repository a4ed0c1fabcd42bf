"""`pivot_dir`: the DDIM pivot computed once per image for every method (`PivotStore`), a run that
reads every pivot equal to the run that computed them, and a stored pivot used only where it fits."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image

import nti_lightning as nti
import nti_lightning.inversion.slots as slots_module
import nti_lightning.inversion.trajectory as trajectory_module
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.inversion.pivot import PivotTrajectory
from nti_lightning.inversion.pivot_store import PivotStore, load_or_compute

PROMPTS = ["a red circle", "a blue square on a green background", "a yellow star", "a cat", "a green triangle"]


@pytest.fixture
def pivot_rows(monkeypatch):
    """Counts the image rows the walks put through a DDIM inversion."""
    counted = {"rows": 0}
    for module in (slots_module, trajectory_module):
        original = module.ddim_invert

        def counting(unet, schedule, z0, cond, _original=original):
            counted["rows"] += z0.shape[0]
            return _original(unet, schedule, z0, cond)

        monkeypatch.setattr(module, "ddim_invert", counting)
    return counted


@pytest.mark.parametrize("scheduling", ["continuous", "lockstep"])
def test_methods_share_each_pivot_and_a_reading_run_equals_a_computing_run(
    independent_pipeline, tmp_path, scheduling, pivot_rows
):
    images = [random_image(seed) for seed in range(5)]
    options = dict(num_inference_steps=4, num_inner_steps=2, batch_size=2, progress_bar=False, scheduling=scheduling,
                   ids=[f"img{k}" for k in range(5)])
    computed = nti.invert(independent_pipeline, images, PROMPTS, pivot_dir=str(tmp_path / "a"), **options)
    assert pivot_rows["rows"] >= 5 and len(list((tmp_path / "a").glob("*.safetensors"))) == 5

    nti.invert(independent_pipeline, images, PROMPTS, method="ddim", pivot_dir=str(tmp_path / "b"), **options)
    pivot_rows["rows"] = 0
    read = nti.invert(independent_pipeline, images, PROMPTS, pivot_dir=str(tmp_path / "b"), **options)
    assert pivot_rows["rows"] == 0  # every pivot came from the ddim run
    for a, b in zip(computed, read):
        assert torch.equal(a.z_T, b.z_T) and torch.equal(a.null_embeddings, b.null_embeddings)
        assert torch.equal(a.source_latent, b.source_latent)
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]

    # without a store: the same inversions up to the float rounding of another memory layout
    plain = nti.invert(independent_pipeline, images, PROMPTS, **options)
    for a, b in zip(plain, read):
        torch.testing.assert_close(a.z_T, b.z_T, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.null_embeddings, b.null_embeddings, rtol=0, atol=5e-3)


def test_a_stored_pivot_is_used_only_where_it_fits(tmp_path):
    schedule = DDIMSchedule.from_scheduler_config(
        {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}, 4
    )
    store = PivotStore(tmp_path, "weights|32-true", schedule)
    z0 = torch.randn(2, 4, 8, 8)
    trajectory = torch.randn(5, 4, 8, 8)
    trajectory[0] = z0[0]
    store.save("img", "a cat", trajectory)
    assert torch.equal(store.load("img", "a cat", z0[0]), trajectory)
    assert store.load("img", "a cat", z0[0] * (1 + 1e-6)) is not None  # another batch's VAE rounding
    assert store.load("img", "a dog", z0[0]) is None  # another prompt
    assert store.load("img", "a cat", z0[1]) is None  # another image under the same id
    assert store.load("other", "a cat", z0[0]) is None  # none stored
    assert PivotStore(tmp_path, "weights|bf16-mixed", schedule).load("img", "a cat", z0[0]) is None  # precision
    other_schedule = DDIMSchedule.from_scheduler_config(
        {**dict(num_train_timesteps=1000), "beta_schedule": "linear"}, 4
    )
    assert PivotStore(tmp_path, "weights|32-true", other_schedule).load("img", "a cat", z0[0]) is None
    (tmp_path / "img.safetensors").write_bytes(b"damaged")
    assert store.load("img", "a cat", z0[0]) is None  # computed again, not an error

    # only the rows without a fitting pivot are computed, padding rows are never stored
    store.save("img", "a cat", trajectory)
    calls = []

    def compute(rows, cond):
        calls.append(rows.shape[0])
        return PivotTrajectory(latents=rows[None].expand(5, *rows.shape).clone(), timesteps=schedule.timesteps)

    cond = nti.diffusion.condition.Condition(torch.zeros(3, 77, 8))
    rows = torch.cat([z0, torch.zeros(1, 4, 8, 8)])
    pivot = load_or_compute(store, compute, schedule, rows, cond, ["img", "new", ""], ["a cat"] * 3,
                                      valid=[True, True, False])
    assert calls == [1] and torch.equal(pivot.latents[:, 0], trajectory)
    assert torch.equal(pivot.latents[:, 2], rows[2][None].expand(5, -1, -1, -1))  # padding: z0, never inverted
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == ["img.safetensors", "new.safetensors"]
