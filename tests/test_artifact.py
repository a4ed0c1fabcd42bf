"""Inversion files: round trip, validation, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nti_lightning import ArtifactError, Inversion


def make_inversion(steps: int = 4) -> Inversion:
    generator = torch.Generator().manual_seed(0)
    return Inversion(
        z_T=torch.randn(4, 8, 8, generator=generator),
        null_embeddings=torch.randn(steps, 77, 32, generator=generator),
        source_latent=torch.randn(4, 8, 8, generator=generator),
        prompt="a red circle",
        metadata={"num_inference_steps": steps, "guidance_scale": 7.5, "inner_iterations": [3] * steps, "id": "x"},
    )


def test_round_trip(tmp_path):
    inversion = make_inversion()
    path = inversion.save(tmp_path / "sub" / "x.safetensors")
    loaded = Inversion.load(path)
    assert torch.equal(loaded.z_T, inversion.z_T)
    assert torch.equal(loaded.null_embeddings, inversion.null_embeddings)
    assert torch.equal(loaded.source_latent, inversion.source_latent)
    assert loaded.prompt == "a red circle"
    assert loaded.metadata["inner_iterations"] == [3] * 4
    assert loaded.num_inference_steps == 4 and loaded.guidance_scale == 7.5
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temporary left


def test_truncated_file_is_named(tmp_path):
    path = make_inversion().save(tmp_path / "x.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"x\.safetensors.*truncated or corrupt"):
        Inversion.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="nope.safetensors: inversion file not found"):
        Inversion.load(tmp_path / "nope.safetensors")


def test_foreign_safetensors_is_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match="weights.safetensors: not an nti-lightning inversion"):
        Inversion.load(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, m: t.update(null_embeddings=torch.zeros(3, 77, 32)), r"null_embeddings \(3, 77, 32\).*\[4, "),
        (lambda t, m: t.update(z_T=torch.zeros(4, 8)), "must both be"),
        (lambda t, m: t.pop("source_latent"), "missing source_latent"),
        (lambda t, m: m.pop("prompt"), "missing prompt"),
        (lambda t, m: t.update(null_embeddings=torch.zeros(4, 77, 32, dtype=torch.float16)), "expected float32"),
    ],
)
def test_inconsistent_contents_are_reported(tmp_path, change, message):
    inversion = make_inversion()
    tensors = {"z_T": inversion.z_T, "null_embeddings": inversion.null_embeddings, "source_latent": inversion.source_latent}
    metadata = {"format": "nti-lightning/inversion", "format_version": 1, **inversion.metadata, "prompt": "p"}
    change(tensors, metadata)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata={"nti": json.dumps(metadata)})
    with pytest.raises(ArtifactError, match=message):
        Inversion.load(path)
