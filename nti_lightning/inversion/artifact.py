"""`Inversion`: the result of inverting one image, and its `.safetensors` file format.

One file per image. Tensors: `z_T` `[C, h, w]`, `null_embeddings` `[T, 77, D]` (fp32),
`source_latent` `[C, h, w]` (the VAE latent of the input) and, for SDXL, `null_pooled_embeddings`
`[T, P]` (fp32). Everything else is JSON in the safetensors header under the key `nti`, so
reading a file never unpickles anything. SDXL files are format 2, so that a version of the package
that knows nothing of pooled embeddings refuses them instead of editing without them.
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
from nti_lightning.inversion.atomic import atomic_path

FORMAT = "nti-lightning/inversion"
FORMAT_VERSION = 2
#: The version written for SD 1.x/2.x inversions (unchanged since the first release).
SD_FORMAT_VERSION = 1
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
    """

    z_T: torch.Tensor
    null_embeddings: torch.Tensor
    source_latent: torch.Tensor
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    null_pooled_embeddings: Optional[torch.Tensor] = None

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

    def save(self, path: str | Path) -> Path:
        """Writes the inversion to `path` atomically (a temporary file, then a rename)."""
        path = Path(path)
        version = FORMAT_VERSION if self.is_sdxl else SD_FORMAT_VERSION
        metadata = {"format": FORMAT, "format_version": version, **self.metadata, "prompt": self.prompt}
        tensors = {
            "z_T": self.z_T.detach().float().contiguous().cpu(),
            "null_embeddings": self.null_embeddings.detach().float().contiguous().cpu(),
            "source_latent": self.source_latent.detach().float().contiguous().cpu(),
        }
        if self.is_sdxl:
            tensors["null_pooled_embeddings"] = self.null_pooled_embeddings.detach().float().contiguous().cpu()
        with atomic_path(path) as temporary:
            save_file(tensors, temporary, metadata={"nti": json.dumps(metadata)})
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
        return cls(
            z_T=tensors["z_T"],
            null_embeddings=tensors["null_embeddings"],
            source_latent=tensors["source_latent"],
            prompt=prompt,
            metadata=metadata,
            null_pooled_embeddings=tensors.get("null_pooled_embeddings"),
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
    if len(null_embeddings) != 3 or null_embeddings[0] != steps:
        raise ArtifactError(
            f"{path}: null_embeddings {null_embeddings} should be [{steps}, tokens, width] "
            f"for num_inference_steps={steps}"
        )
    if null_dtype not in ("F32", "float32"):
        raise ArtifactError(f"{path}: null_embeddings are {null_dtype}, expected float32")
    if "null_pooled_embeddings" in layout:
        pooled, pooled_dtype = layout["null_pooled_embeddings"]
        if len(pooled) != 2 or pooled[0] != steps:
            raise ArtifactError(f"{path}: null_pooled_embeddings {pooled} should be [{steps}, width] for num_inference_steps={steps}")
        if pooled_dtype not in ("F32", "float32"):
            raise ArtifactError(f"{path}: null_pooled_embeddings are {pooled_dtype}, expected float32")
        time_ids = metadata.get("time_ids")
        if not (isinstance(time_ids, list) and len(time_ids) == 6 and all(isinstance(v, (int, float)) for v in time_ids)):
            raise ArtifactError(f"{path}: an SDXL inversion needs its six time_ids in the metadata, got {time_ids!r}")
    return {k: v for k, v in metadata.items() if k not in ("format", "format_version")}
