"""`Inversion`: the result of inverting one image, and its `.safetensors` file format.

One file per image. Tensors: `z_T` `[C, h, w]`, `null_embeddings` `[T, 77, D]` (fp32),
`source_latent` `[C, h, w]` (the VAE latent of the input) and, for SDXL, `null_pooled_embeddings`
`[T, P]` (fp32). Everything else is JSON in the safetensors header under the key `nti`, so
reading a file never unpickles anything. SDXL files are format 2, so that a version of the package
that knows nothing of pooled embeddings refuses them instead of editing without them.

Two ways to make files smaller, format 3 (older versions refuse such files rather than misread
them), both undone by `load`, which always gives `[T, ...]` fp32 tensors:

* null tensors whose T steps are all the same (the negative-prompt and DDIM baselines) are
  stored once, `[1, ...]`, with `"shared_null": true` in the metadata;
* `save(path, null_dtype="float16")` stores the null tensors in half precision
  (`"null_dtype": "float16"`): half the bytes of an SD file, a reconstruction within 0.05 dB of
  the fp32 file's (docs/ARTIFACTS.md has the measurements).

Direct Inversion (`method: direct`) adds `latent_offsets` `[T, C, h, w]` (fp32): per step, what
the source branch adds to its latent to land back on the pivot (format 3 as well).

Format 4 is any file of a method added after those four, so that a version that would read its
offsets as Direct Inversion's refuses it as newer: edit-friendly DDPM (`latent_offsets` holds its
noise terms σ_t z_t, `z_T` is the latent at the step its edits start at), ProxNPI
(`pivot_latents` `[T, C, h, w]`, the pivot latent each step lands on) and EDICT
(`coupled_latents` `[2, C, h, w]` float64, its latent pair where its edits start), each with its
settings in the metadata (`method_options`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nti_lightning.errors import NtiError
from nti_lightning.storage.atomic import atomic_path

FORMAT = "nti-lightning/inversion"
FORMAT_VERSION = 4
#: The version written for files in format 3's layout, for the methods that version knew.
OFFSETS_FORMAT_VERSION = 3
#: The methods of formats 1-3; a file of any other method is format 4, so that a version that
#: would take its offsets for Direct Inversion's refuses it instead.
FORMAT_3_METHODS = ("null_text", "negative_prompt", "ddim", "direct")
#: The version written for SDXL inversions with full fp32 per-step null tensors.
SDXL_FORMAT_VERSION = 2
#: The version written for SD 1.x/2.x inversions with full fp32 per-step null tensors (unchanged
#: since the first release).
SD_FORMAT_VERSION = 1
#: How the null tensors may be stored: safetensors' dtype names by the name `save` takes.
NULL_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16)}
REQUIRED_METADATA = ("prompt", "num_inference_steps", "guidance_scale")


class ArtifactError(NtiError, ValueError):
    """An inversion file is missing, truncated or inconsistent; the message names the file."""


@dataclass
class Inversion:
    """What Null-text Inversion found for one image.

    Args:
        z_T (`torch.Tensor`): `[C, h, w]` the inverted noise the edit starts from.
        null_embeddings (`torch.Tensor`): `[T, 77, D]` fp32, the unconditional embedding of step i
            (step 0 is the noisiest).
        source_latent (`torch.Tensor`): `[C, h, w]` the VAE latent `z0` of the input image.
        prompt (`str`): the source prompt.
        metadata (`dict`): model reference, scheduler config, T, w, N, ε, image size, per-step
            inner iterations and final losses, package version, id; for SDXL also `time_ids`.
        null_pooled_embeddings (`torch.Tensor`, *optional*): `[T, P]` fp32, SDXL's pooled null
            embedding of step i; `None` for SD 1.x/2.x.
        latent_offsets (`torch.Tensor`, *optional*): `[T, C, h, w]` fp32, Direct Inversion's
            offset of step i, added to the source branch after its step (edit-friendly DDPM's
            noise term of step i, added to every row); `None` for the other methods.
        pivot_latents (`torch.Tensor`, *optional*): `[T, C, h, w]` fp32, the pivot latent step i
            lands on (ProxNPI pulls its edits towards them); `None` for the other methods.
        coupled_latents (`torch.Tensor`, *optional*): `[2, C, h, w]` float64, EDICT's latent pair
            at the step its edits start at; `None` for the other methods.
    """

    z_T: torch.Tensor
    null_embeddings: torch.Tensor
    source_latent: torch.Tensor
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    null_pooled_embeddings: Optional[torch.Tensor] = None
    latent_offsets: Optional[torch.Tensor] = None
    pivot_latents: Optional[torch.Tensor] = None
    coupled_latents: Optional[torch.Tensor] = None

    @property
    def is_sdxl(self) -> bool:
        """Whether the inversion was made with an SDXL model (it has pooled null embeddings)."""
        return self.null_pooled_embeddings is not None

    @property
    def num_inference_steps(self) -> int:
        return self.null_embeddings.shape[0]

    @property
    def guidance_scale(self) -> float:
        return float(self.metadata.get("guidance_scale", 7.5))

    def save(self, path: str | Path, null_dtype: str = "float32") -> Path:
        """Writes the inversion to `path` atomically (a temporary file, then a rename).

        Args:
            path (`str` or `Path`): the `.safetensors` file.
            null_dtype (`str`, defaults to "float32"): "float16" stores the null tensors in half
                precision (format 3; see the module's docstring).
        """
        if null_dtype not in NULL_DTYPES:
            raise ValueError(f"null_dtype must be one of {sorted(NULL_DTYPES)}, got {null_dtype!r}")
        path = Path(path)
        nulls = {"null_embeddings": self.null_embeddings}
        if self.is_sdxl:
            nulls["null_pooled_embeddings"] = self.null_pooled_embeddings
        # One copy of null tensors that are the same at every step.
        shared = all(bool((null == null[:1]).all()) for null in nulls.values())
        metadata = {**self.metadata, "prompt": self.prompt}
        for key in ("shared_null", "null_dtype"):
            metadata.pop(key, None)
        if shared:
            metadata["shared_null"] = True
        if null_dtype != "float32":
            metadata["null_dtype"] = null_dtype
        newer = shared or null_dtype != "float32" or self.latent_offsets is not None
        version = OFFSETS_FORMAT_VERSION if newer else SDXL_FORMAT_VERSION if self.is_sdxl else SD_FORMAT_VERSION
        if metadata.get("method", "null_text") not in FORMAT_3_METHODS:
            version = FORMAT_VERSION
        dtype = NULL_DTYPES[null_dtype][1]
        tensors = {
            "z_T": self.z_T.detach().float().contiguous().cpu(),
            "source_latent": self.source_latent.detach().float().contiguous().cpu(),
        }
        for key, null in nulls.items():
            tensors[key] = (null[:1] if shared else null).detach().float().to(dtype).contiguous().cpu()
        for key in ("latent_offsets", "pivot_latents"):
            value = getattr(self, key)
            if value is not None:
                tensors[key] = value.detach().float().contiguous().cpu()
        if self.coupled_latents is not None:  # float64: EDICT's exact inverse needs every bit
            tensors["coupled_latents"] = self.coupled_latents.detach().double().contiguous().cpu()
        with atomic_path(path) as temporary:
            header = {"format": FORMAT, "format_version": version, **metadata}
            save_file(tensors, temporary, metadata={"nti": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Inversion":
        """Reads and validates a file written by `save`; raises `ArtifactError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: inversion file not found")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ArtifactError(f"{path}: not a readable inversion file (truncated or corrupt: {error})") from error
        metadata = cls.read_metadata(path)
        prompt = metadata.pop("prompt")
        steps = metadata["num_inference_steps"]
        shared = metadata.pop("shared_null", False)
        metadata.pop("null_dtype", None)

        def null(key: str) -> Optional[torch.Tensor]:
            """The stored null tensor as `[T, ...]` fp32 (a shared one repeated, half precision widened)."""
            if key not in tensors:
                return None
            value = tensors[key].float()
            return value.expand(steps, *value.shape[1:]).clone() if shared else value

        return cls(
            z_T=tensors["z_T"],
            null_embeddings=null("null_embeddings"),
            source_latent=tensors["source_latent"],
            prompt=prompt,
            metadata=metadata,
            null_pooled_embeddings=null("null_pooled_embeddings"),
            latent_offsets=tensors.get("latent_offsets"),
            pivot_latents=tensors.get("pivot_latents"),
            coupled_latents=tensors.get("coupled_latents"),
        )

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, Any]:
        """Validates a file's header (format, metadata, tensor shapes and dtypes) without reading
        its tensors, and returns its metadata (with "prompt"); raises `ArtifactError` naming the file.

        Files are written atomically, so a valid header means a complete file: this is what a
        resumed dataset run checks for each existing artifact.
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: inversion file not found")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = json.loads((handle.metadata() or {}).get("nti", "null"))
                layout = {
                    key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                    for key in handle.keys()
                }
        except (SafetensorError, OSError, ValueError) as error:
            raise ArtifactError(f"{path}: not a readable inversion file (truncated or corrupt: {error})") from error
        return _validated(path, layout, metadata)


def _validated(path: Path, layout: dict[str, tuple[tuple[int, ...], str]], metadata: Any) -> dict[str, Any]:
    """Checks a file's tensor `layout` (name: (shape, dtype)) and `metadata`; returns the metadata."""
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an nti-lightning inversion (no '{FORMAT}' metadata)")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: written by a newer nti-lightning (format {metadata['format_version']}); upgrade to read it"
        )
    missing = [key for key in ("z_T", "null_embeddings", "source_latent") if key not in layout]
    missing += [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ArtifactError(f"{path}: missing {', '.join(missing)}")
    (z_T, _), (source, _) = layout["z_T"], layout["source_latent"]
    null_embeddings, null_dtype = layout["null_embeddings"]
    if len(z_T) != 3 or source != z_T:
        raise ArtifactError(f"{path}: z_T {z_T} and source_latent {source} must both be [C, h, w]")
    steps = metadata["num_inference_steps"]
    shared = metadata.get("shared_null", False)
    rows = 1 if shared else steps
    stored = metadata.get("null_dtype", "float32")
    if stored not in NULL_DTYPES:
        raise ArtifactError(f"{path}: null_dtype {stored!r} is not one of {sorted(NULL_DTYPES)}")
    if len(null_embeddings) != 3 or null_embeddings[0] != rows:
        raise ArtifactError(
            f"{path}: null_embeddings {null_embeddings} should be [{rows}, tokens, width] "
            f"for num_inference_steps={steps}" + (" stored once (shared_null)" if shared else "")
        )
    if null_dtype not in (NULL_DTYPES[stored][0], stored):
        raise ArtifactError(f"{path}: null_embeddings are {null_dtype}, expected {stored}")
    for key in ("latent_offsets", "pivot_latents"):
        if key in layout:
            shape, dtype = layout[key]
            if shape != (steps, *z_T) or dtype not in ("F32", "float32"):
                raise ArtifactError(f"{path}: {key} {shape} {dtype} should be [{steps}, *{z_T}] float32")
    if "coupled_latents" in layout:
        shape, dtype = layout["coupled_latents"]
        if shape != (2, *z_T) or dtype not in ("F64", "float64"):
            raise ArtifactError(f"{path}: coupled_latents {shape} {dtype} should be [2, *{z_T}] float64")
    if "null_pooled_embeddings" in layout:
        pooled, pooled_dtype = layout["null_pooled_embeddings"]
        if len(pooled) != 2 or pooled[0] != rows:
            raise ArtifactError(
                f"{path}: null_pooled_embeddings {pooled} should be [{rows}, width] for num_inference_steps={steps}"
            )
        if pooled_dtype not in (NULL_DTYPES[stored][0], stored):
            raise ArtifactError(f"{path}: null_pooled_embeddings are {pooled_dtype}, expected {stored}")
        time_ids = metadata.get("time_ids")
        if not (
            isinstance(time_ids, list) and len(time_ids) == 6 and all(isinstance(v, (int, float)) for v in time_ids)
        ):
            raise ArtifactError(f"{path}: an SDXL inversion needs its six time_ids in the metadata, got {time_ids!r}")
    return {k: v for k, v in metadata.items() if k not in ("format", "format_version")}
