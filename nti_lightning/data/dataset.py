"""Datasets of images to invert: a manifest (JSONL or CSV) or a folder with `.txt` prompt sidecars.

A manifest row names an `image` (a path, relative to the manifest's folder unless absolute), its
source `prompt` (in JSONL `""` is the empty prompt), optionally an `id` (the artifact's name;
default: the file stem) and `edits` (carried into the artifact's metadata for `nti predict`):

    {"image": "photos/cat.jpg", "prompt": "a cat sitting on a sofa", "id": "cat-01"}

    image,prompt,id
    photos/cat.jpg,a cat sitting on a sofa,cat-01

A folder is every image file in it (not recursive), each with its prompt in `<stem>.txt`.

A `.json` manifest is PIE-Bench's `mapping_file.json` (`nti_lightning.data.pie_bench`): ids are its
keys, images `annotation_images/<image_path>` beside it, prompts the `original_prompt`s.

Reading a dataset never stops at one bad entry: a row without an image or a prompt, an id that
is not one plain file name (see `nti_lightning.errors.unsafe_id_reason`), an image that is
missing or unreadable, or a prompt sidecar that is missing is returned as a `Failure`
with its reason, and the run inverts the rest.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from nti_lightning.data.images import MIN_SIDE
from nti_lightning.data.pie_bench import is_mapping_file, read_mapping
from nti_lightning.data.walk import ImageSample
from nti_lightning.errors import NtiError, unsafe_id_reason

#: File types taken from a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class DatasetError(NtiError, ValueError):
    """The dataset itself (not one of its images) cannot be read; the message names the file."""


@dataclass(frozen=True)
class Failure:
    """An entry of the dataset that is not inverted, and why.

    Args:
        id (`str`): the entry's id (or its file name / manifest line when it has none).
        image (`str`): the image path as given.
        reason (`str`): what is wrong, naming the file.
    """

    id: str
    image: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "image": self.image, "reason": self.reason}


def read_manifest(path: str | Path) -> tuple[list[ImageSample], list[Failure]]:
    """Samples of a `.jsonl` or `.csv` manifest (or a PIE-Bench `.json` mapping file), and the
    rows that cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest file not found")
    if is_mapping_file(path):
        bench, unusable = read_mapping(path)
        samples = [ImageSample(id=s.id, prompt=s.original_prompt, image=s.image) for s in bench]
        return samples, [Failure(id=key, image="", reason=reason) for key, reason in unusable]
    if path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        raise DatasetError(
            f"{path}: a manifest must be .jsonl, .csv or a PIE-Bench mapping_file.json, not "
            f"{path.suffix or 'extensionless'}"
        )
    samples, failures = [], []
    for line, row in rows:
        where = f"{path}:{line}"
        if isinstance(row, str):  # a line that could not be parsed
            failures.append(Failure(id=f"line-{line}", image="", reason=f"{where}: {row}"))
            continue
        image, prompt = row.get("image"), row.get("prompt")
        if not image or not isinstance(image, str):
            failures.append(Failure(id=f"line-{line}", image="", reason=f"{where}: no 'image' field"))
            continue
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        name = str(row.get("id") or Path(image).stem)
        unsafe = unsafe_id_reason(name)
        if unsafe is not None:  # an id names a file in the output folder: it must stay inside it
            failures.append(Failure(id=f"line-{line}", image=str(image_path), reason=f"{where}: {unsafe}"))
            continue
        # JSONL's explicit "" is the empty prompt (MasaCtrl's benchmark inverts with it); an empty
        # CSV cell is a prompt left out.
        if not isinstance(prompt, str) or (not prompt.strip() and (prompt != "" or path.suffix.lower() == ".csv")):
            failures.append(Failure(id=name, image=str(image_path), reason=f"{where}: no 'prompt' for {image}"))
            continue
        edits = row.get("edits")
        if isinstance(edits, str) and edits.strip():  # CSV cells hold JSON
            try:
                edits = json.loads(edits)
            except json.JSONDecodeError as error:
                failures.append(
                    Failure(id=name, image=str(image_path), reason=f"{where}: 'edits' is not JSON ({error})")
                )
                continue
        samples.append(ImageSample(id=name, prompt=prompt, image=image_path, edits=edits or None))
    return samples, failures


def read_folder(folder: str | Path) -> tuple[list[ImageSample], list[Failure]]:
    """Samples of every image in `folder` with a `<stem>.txt` prompt, and those without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    samples, failures = [], []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        unsafe = unsafe_id_reason(image.stem)
        if unsafe is not None:
            failures.append(Failure(id=image.name, image=str(image), reason=f"{image}: {unsafe}"))
            continue
        sidecar = image.with_suffix(".txt")
        prompt = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        if not prompt:
            failures.append(
                Failure(id=image.stem, image=str(image), reason=f"{sidecar}: no prompt sidecar (or it is empty)")
            )
            continue
        samples.append(ImageSample(id=image.stem, prompt=prompt, image=image))
    if not samples and not failures:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples, failures


def check_image(path: str | Path) -> Optional[str]:
    """Why the image at `path` cannot be inverted, or `None` when its header looks usable.

    Only the header is read (cheap for thousands of files); an image whose pixel data turns out
    corrupt is caught again when it is decoded.
    """
    path = Path(path)
    if not path.is_file():
        return f"{path}: image file not found"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"{path}: not a readable image ({error})"
    if min(width, height) < MIN_SIDE:
        return f"{path}: degenerate image ({width}x{height} px; at least {MIN_SIDE} px a side)"
    return None


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                rows.append((line, f"not JSON ({error})"))
                continue
            rows.append((line, row if isinstance(row, dict) else "not a JSON object"))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "image" not in reader.fieldnames or "prompt" not in reader.fieldnames:
            raise DatasetError(
                f"{path}: the CSV header must name 'image' and 'prompt' columns, got {reader.fieldnames}"
            )
        return [(reader.line_num, dict(row)) for row in reader]
