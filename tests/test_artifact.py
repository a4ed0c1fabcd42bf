"""Inversion files: round trip, validation, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open
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
        (lambda t, m: m.update(shared_null=True), r"should be \[1, tokens, width\].*shared_null"),
        (lambda t, m: m.update(null_dtype="float16"), "are F32, expected float16"),
        (lambda t, m: m.update(null_dtype="int4"), "null_dtype 'int4' is not one of"),
    ],
)
def test_inconsistent_contents_are_reported(tmp_path, change, message):
    inversion = make_inversion()
    tensors = {
        "z_T": inversion.z_T,
        "null_embeddings": inversion.null_embeddings,
        "source_latent": inversion.source_latent,
    }
    metadata = {"format": "nti-lightning/inversion", "format_version": 1, **inversion.metadata, "prompt": "p"}
    change(tensors, metadata)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata={"nti": json.dumps(metadata)})
    with pytest.raises(ArtifactError, match=message):
        Inversion.load(path)


# ------------------------------------------------------------------------- sized for scale
def test_baseline_nulls_are_stored_once_and_load_as_every_step(tmp_path):
    """The negative-prompt and DDIM methods' null is the same at every step: one copy on disk."""
    per_step = make_inversion(steps=50)
    shared = make_inversion(steps=50)
    shared.null_embeddings = shared.null_embeddings[:1].expand(50, -1, -1).clone()
    full, once = per_step.save(tmp_path / "full.safetensors"), shared.save(tmp_path / "once.safetensors")
    assert once.stat().st_size * 20 < full.stat().st_size
    loaded = Inversion.load(once)
    assert loaded.null_embeddings.shape == (50, 77, 32) and loaded.null_embeddings.dtype == torch.float32
    assert torch.equal(loaded.null_embeddings, shared.null_embeddings)
    assert "shared_null" not in loaded.metadata and Inversion.read_metadata(once)["shared_null"] is True
    # saved again (e.g. after editing its metadata), it is the same file format
    assert torch.equal(
        Inversion.load(loaded.save(tmp_path / "again.safetensors")).null_embeddings, shared.null_embeddings
    )


def test_half_precision_nulls_load_as_fp32_within_fp16_rounding(tmp_path):
    inversion = make_inversion()
    path = inversion.save(tmp_path / "half.safetensors", null_dtype="float16")
    assert path.stat().st_size < 0.6 * inversion.save(tmp_path / "full.safetensors").stat().st_size
    loaded = Inversion.load(path)
    assert loaded.null_embeddings.dtype == torch.float32
    assert torch.equal(loaded.null_embeddings, inversion.null_embeddings.half().float())
    assert torch.equal(loaded.z_T, inversion.z_T)  # only the null tensors are narrowed
    with pytest.raises(ValueError, match="null_dtype must be one of"):
        inversion.save(tmp_path / "x.safetensors", null_dtype="int8")


def test_files_without_the_new_options_keep_their_format(tmp_path):
    """Per-step fp32 nulls are written exactly as before (format 1 for SD), so older versions read them."""
    path = make_inversion().save(tmp_path / "x.safetensors")
    with safe_open(path, framework="pt") as handle:
        header = json.loads(handle.metadata()["nti"])
    assert header["format_version"] == 1 and "shared_null" not in header and "null_dtype" not in header
    half = make_inversion().save(tmp_path / "h.safetensors", null_dtype="float16")
    with safe_open(half, framework="pt") as handle:
        assert json.loads(handle.metadata()["nti"])["format_version"] == 3  # older versions refuse it


def test_sdxl_pooled_nulls_share_the_storage_options(tmp_path):
    inversion = make_inversion()
    inversion.metadata["time_ids"] = [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    inversion.null_embeddings = inversion.null_embeddings[:1].expand(4, -1, -1).clone()
    inversion.null_pooled_embeddings = torch.randn(1, 20).expand(4, -1).clone()
    loaded = Inversion.load(inversion.save(tmp_path / "xl.safetensors", null_dtype="float16"))
    assert loaded.null_pooled_embeddings.shape == (4, 20) and loaded.null_pooled_embeddings.dtype == torch.float32
    assert torch.equal(loaded.null_pooled_embeddings, inversion.null_pooled_embeddings.half().float())
    assert torch.equal(loaded.null_embeddings, inversion.null_embeddings.half().float())
    # a pooled null that varies with the step keeps both tensors per step
    inversion.null_pooled_embeddings = torch.randn(4, 20)
    again = Inversion.load(inversion.save(tmp_path / "xl2.safetensors"))
    assert torch.equal(again.null_pooled_embeddings, inversion.null_pooled_embeddings)
    assert torch.equal(again.null_embeddings, inversion.null_embeddings)


def test_direct_inversion_offsets_round_trip_and_are_checked(tmp_path):
    inversion = make_inversion()
    inversion.latent_offsets = torch.randn(4, 4, 8, 8)
    loaded = Inversion.load(inversion.save(tmp_path / "direct.safetensors"))
    assert torch.equal(loaded.latent_offsets, inversion.latent_offsets)
    assert Inversion.load(make_inversion().save(tmp_path / "plain.safetensors")).latent_offsets is None
    tensors = {"z_T": inversion.z_T, "null_embeddings": inversion.null_embeddings,
               "source_latent": inversion.source_latent, "latent_offsets": torch.zeros(3, 4, 8, 8)}
    metadata = {"format": "nti-lightning/inversion", "format_version": 3, **inversion.metadata, "prompt": "p"}
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"nti": json.dumps(metadata)})
    with pytest.raises(ArtifactError, match=r"latent_offsets \(3, 4, 8, 8\) F32 should be \[4, \*\(4, 8, 8\)\]"):
        Inversion.load(tmp_path / "bad.safetensors")
