"""`InversionCache`: finished inversions on disk, found again by what made them.

An entry is three files named by its key: `<key>.input.png` (the image as the model saw it),
`<key>.reconstruction.png` and `<key>.safetensors` (the `Inversion`). Each is written atomically
(a temporary file, then a rename) and the inversion last, so an entry exists only once it is
complete: a run that fails or is cancelled half-way leaves nothing that `get` would return.

The key of an inverted image (`inversion_key`) is the SHA-256 of the pixels the model inverted
(after the package's own preparation: RGB, centre square, model resolution), the source prompt,
the model's weights fingerprint and the settings that change the result (method, T, w, N, ε,
learning rate, precision). The same image is therefore never inverted twice, across restarts
too, while another model, prompt or setting gets its own entry. An uploaded `.safetensors` file
is keyed by its bytes and the model's fingerprint (`artifact_key`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from nti_lightning.inversion.artifact import ArtifactError, Inversion
from nti_lightning.storage.atomic import atomic_path, ensure_folder

#: Bumped when what a key covers changes, so that old entries are not mistaken for new ones.
KEY_VERSION = 1


def inversion_key(image: Image.Image, prompt: str, fingerprint: str, settings: dict[str, Any]) -> str:
    """The cache key of inverting `image` (already prepared) with `prompt` under `settings`."""
    digest = hashlib.sha256()
    described = {"key_version": KEY_VERSION, "prompt": prompt, "model_fingerprint": fingerprint, **settings}
    digest.update(json.dumps(described, sort_keys=True).encode())
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    digest.update(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def artifact_key(data: bytes, fingerprint: str) -> str:
    """The cache key of an uploaded inversion file, from its bytes and the model it is used with."""
    return hashlib.sha256(f"nti-lightning/artifact/{KEY_VERSION}/{fingerprint}\0".encode() + data).hexdigest()


@dataclass(frozen=True)
class CachedInversion:
    """One cache entry: the inversion with the pictures shown beside it.

    Args:
        key (`str`): the entry's key.
        inversion (`Inversion`): the inversion.
        input_image (`PIL.Image`): the image as the model saw it (for an uploaded file, its VAE decoding).
        reconstruction (`PIL.Image`): the image sampled back from the inversion with its own w.
        path (`Path`): the `.safetensors` file.
    """

    key: str
    inversion: Inversion
    input_image: Image.Image
    reconstruction: Image.Image
    path: Path

    @property
    def input_path(self) -> Path:
        """The input picture's PNG."""
        return self.path.with_suffix(".input.png")

    @property
    def reconstruction_path(self) -> Path:
        """The reconstruction's PNG."""
        return self.path.with_suffix(".reconstruction.png")

    @property
    def psnr(self) -> Optional[float]:
        """PSNR (dB) of the reconstruction against the input, when the inversion recorded it."""
        metrics = self.inversion.metadata.get("metrics") or {}
        value = metrics.get("psnr") if isinstance(metrics, dict) else None
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def method(self) -> str:
        return str(self.inversion.metadata.get("method", "null_text"))


class InversionCache:
    """A folder of finished inversions, with the last few also kept in memory.

    Args:
        folder (`str` or `Path`): where the entries go (created when missing).
        memory_items (`int`, defaults to 8): entries kept loaded for quick hits (an SDXL inversion
            is about 16 MB).
    """

    def __init__(self, folder: str | Path, memory_items: int = 8) -> None:
        self.folder = ensure_folder(Path(folder).expanduser())
        self.memory_items = memory_items
        self._memory: OrderedDict[str, CachedInversion] = OrderedDict()
        self._lock = threading.Lock()

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        """The entry's input picture, reconstruction picture and inversion file."""
        if not key or any(ch not in "0123456789abcdef" for ch in key):
            raise ValueError(f"not a cache key: {key!r}")
        base = self.folder / key
        return base.with_suffix(".input.png"), base.with_suffix(".reconstruction.png"), base.with_suffix(".safetensors")

    def get(self, key: str) -> Optional[CachedInversion]:
        """The entry of `key`, or None when there is no complete, readable one."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        input_path, reconstruction_path, path = self.paths(key)
        if not path.is_file():
            return None
        try:
            inversion = Inversion.load(path)
            input_image = _read_png(input_path)
            reconstruction = _read_png(reconstruction_path)
        except (ArtifactError, OSError, ValueError):
            return None  # an entry damaged on disk is made again
        return self._remember(CachedInversion(key, inversion, input_image, reconstruction, path))

    def put(
        self, key: str, inversion: Inversion, input_image: Image.Image, reconstruction: Image.Image
    ) -> CachedInversion:
        """Writes an entry (pictures first, the inversion last, each atomically) and returns it."""
        input_path, reconstruction_path, path = self.paths(key)
        for image, target in ((input_image, input_path), (reconstruction, reconstruction_path)):
            with atomic_path(target) as temporary:
                image.save(temporary, format="PNG")
        inversion.save(path)
        return self._remember(CachedInversion(key, inversion, input_image.copy(), reconstruction.copy(), path))

    def _remember(self, entry: CachedInversion) -> CachedInversion:
        with self._lock:
            self._memory[entry.key] = entry
            self._memory.move_to_end(entry.key)
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)
        return entry


def _read_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")
