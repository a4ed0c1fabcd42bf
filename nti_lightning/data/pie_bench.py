"""PIE-Bench's `mapping_file.json`: its samples as a dataset to invert, and as the edits to make.

PIE-Bench (cure-lab/PnPInversion) ships `mapping_file.json` beside `annotation_images/`: a JSON
object keyed by a 12-digit id, each value

    {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a slanted mountain bicycle ...",
     "editing_prompt": "a slanted [rusty] mountain bicycle ...", "editing_instruction": "...",
     "editing_type_id": "0", "blended_word": "bicycle bicycle", "mask": [start, length, ...]}

`read_mapping` gives one `BenchSample` per entry (the changed words' brackets stripped, as both of
the benchmark's scripts strip them) and the entries that cannot be used, each with its reason.
The edits the benchmark makes of each sample are `nti_lightning.editing.pie_bench`'s; the
mask codec is `nti_lightning.data.pie_masks`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nti_lightning.errors import BenchmarkError, unsafe_id_reason

#: `editing_type_id` -> the edit type's name.
EDIT_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change content",
    "5": "change pose",
    "6": "change colour",
    "7": "change material",
    "8": "change background",
    "9": "change style",
}

#: The fields every entry must have.
REQUIRED = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "blended_word", "mask")


@dataclass(frozen=True)
class BenchSample:
    """One PIE-Bench sample.

    Args:
        id (`str`): its key in the mapping file.
        image (`Path`): `annotation_images/<image_path>`, beside the mapping file.
        image_path (`str`): the path as the file gives it (also where the authors' scripts write the edit).
        original_prompt (`str`): the source prompt.
        editing_prompt (`str`): the target prompt, brackets stripped.
        editing_instruction (`str`): the instruction ("" when absent).
        editing_type_id (`str`): "0" to "9" (see `EDIT_TYPES`).
        blended_word (`tuple[str, str]`, *optional*): (source word, target word), `None` for "".
        mask (`list[int]`): the edit region's runs `[start, length, ...]` over the image flattened row-major.
    """

    id: str
    image: Path
    image_path: str
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: Optional[tuple[str, str]]
    mask: list[int]


def strip_brackets(prompt: str) -> str:
    """The prompt without the `[` and `]` that mark its changed words."""
    return prompt.replace("[", "").replace("]", "")


def is_mapping_file(path: str | Path) -> bool:
    """Whether `path` looks like a PIE-Bench mapping file (a `.json` file), as opposed to a manifest."""
    return Path(path).suffix.lower() == ".json"


def read_mapping(path: str | Path) -> tuple[list[BenchSample], list[tuple[str, str]]]:
    """The samples of a mapping file, in its order, and `(id, reason)` for the entries that cannot
    be used. Raises `BenchmarkError` when the file is missing, not JSON or not an object of entries."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: mapping file not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(entries, dict):
        raise BenchmarkError(
            f"{path}: a mapping file is a JSON object keyed by sample id, got {type(entries).__name__}"
        )
    images = path.parent / "annotation_images"
    samples, failures = [], []
    for key, entry in entries.items():
        where = f"{path}: sample {key!r}"
        unsafe = unsafe_id_reason(str(key))
        if unsafe is not None:
            failures.append((str(key), f"{where}: {unsafe}"))
            continue
        if not isinstance(entry, dict):
            failures.append((key, f"{where}: not an object"))
            continue
        missing = [name for name in REQUIRED if name not in entry]
        if missing:
            failures.append((key, f"{where}: missing {', '.join(missing)}"))
            continue
        problem = _field_problem(entry)
        if problem:
            failures.append((key, f"{where}: {problem}"))
            continue
        words = entry["blended_word"].split()
        samples.append(BenchSample(
            id=key,
            image=images / entry["image_path"],
            image_path=entry["image_path"],
            original_prompt=strip_brackets(entry["original_prompt"]),
            editing_prompt=strip_brackets(entry["editing_prompt"]),
            editing_instruction=str(entry.get("editing_instruction") or ""),
            editing_type_id=str(entry["editing_type_id"]),
            blended_word=(words[0], words[1]) if len(words) == 2 else None,
            mask=list(entry["mask"]),
        ))
    return samples, failures


def _field_problem(entry: dict[str, Any]) -> Optional[str]:
    """What is wrong with an entry's fields, or `None`."""
    for name in ("image_path", "original_prompt", "editing_prompt"):
        if not isinstance(entry[name], str) or not entry[name].strip():
            return f"'{name}' must be a non-empty string"
    if str(entry["editing_type_id"]) not in EDIT_TYPES:
        return f"editing_type_id {entry['editing_type_id']!r} is not one of {sorted(EDIT_TYPES)}"
    blended = entry["blended_word"]
    if not isinstance(blended, str) or len(blended.split()) not in (0, 2):
        return f"blended_word {blended!r} must be 'source_word target_word' or ''"
    mask = entry["mask"]
    if not isinstance(mask, list) or len(mask) % 2 or not all(isinstance(v, int) and v >= 0 for v in mask):
        return "mask must be a list of [start, length] pairs of non-negative integers"
    return None
