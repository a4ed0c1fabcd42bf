"""An offline PIE-Bench: a benchmark in PIE-Bench's format made by the `shapes` generator.

`write_shapes_bench(root, count)` writes `root/mapping_file.json` and `root/annotation_images/`
for `count` held-out images of `nti_lightning.demo.shapes` (images the `shapes` model never saw),
each with an edit the model can do, in turn:

* change colour (PIE's type 6): "a red circle on a green background" -> "a [blue] circle on a
  green background", blend words "circle circle", the shape's region to edit;
* change object (type 1): "a red [triangle] on a green background", blend words "circle
  triangle", the region of the shape and of its bounding box (where a new shape may be drawn);
* change background (type 8): "a red circle on a [blue] background", blend words "background
  background", everything but the shape to edit.

The masks are exact: the pixels a perfect edit changes, read off the generator's coverage (a
shape edit may change every pixel the shape touches, anti-aliased edge included; a background
edit every pixel the shape does not cover whole), run-length encoded over the image's own size as
PIE-Bench's are over 512x512. So the benchmark's unedited-region metrics measure exactly what an
edit should have kept: the edit the generator itself draws scores an infinite PSNR there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nti_lightning.data.pie_masks import encode_mask
from nti_lightning.demo.shapes import (
    BACKGROUND_COLORS,
    RESOLUTION,
    SHAPE_COLORS,
    SHAPES,
    ShapeSample,
    caption_for,
    heldout_samples,
)
from nti_lightning.storage.atomic import atomic_text

#: The edit types the `shapes` model can do: PIE-Bench's `editing_type_id` and folder name.
EDIT_TYPES = (("6", "6_change_attribute_color"), ("1", "1_change_object"), ("8", "8_change_background"))


def bench_entry(sample: ShapeSample, kind: str, image_path: str) -> dict:
    """The mapping-file entry of `sample` with an edit of PIE-Bench type `kind`."""
    touched = sample.coverage > 0  # every pixel the shape's colour reaches
    if kind == "6":
        color = next(c for c in SHAPE_COLORS if c not in (sample.color, sample.background))
        editing = caption_for(sample.color, sample.shape, sample.background).replace(
            f"a {sample.color} ", f"a [{color}] ", 1
        )
        blended, mask, instruction = f"{sample.shape} {sample.shape}", touched, f"make the {sample.shape} {color}"
    elif kind == "1":
        shape = next(s for s in SHAPES if s != sample.shape)
        editing = caption_for(sample.color, sample.shape, sample.background).replace(
            f" {sample.shape} ", f" [{shape}] ", 1
        )
        left, top, right, bottom = sample.box
        mask = touched.copy()
        mask[top:bottom, left:right] = True
        blended, instruction = f"{sample.shape} {shape}", f"turn the {sample.shape} into a {shape}"
    elif kind == "8":
        background = next(c for c in BACKGROUND_COLORS if c not in (sample.color, sample.background))
        editing = caption_for(sample.color, sample.shape, sample.background).replace(
            f"on a {sample.background} ", f"on a [{background}] ", 1
        )
        blended, mask, instruction = "background background", sample.coverage < 1, f"make the background {background}"
    else:
        raise ValueError(f"no shapes edit of type {kind!r}; types: {[k for k, _ in EDIT_TYPES]}")
    return {
        "image_path": image_path,
        "original_prompt": sample.caption,
        "editing_prompt": editing,
        "editing_instruction": instruction,
        "editing_type_id": kind,
        "blended_word": blended,
        "mask": encode_mask(np.asarray(mask)),
    }


def write_shapes_bench(root: str | Path, count: int = 24, start: int = 0, resolution: int = RESOLUTION) -> Path:
    """Writes the offline benchmark of held-out samples `start .. start + count - 1` into `root`
    (images as PNG, the edit types taken in turn); returns the mapping file. An existing
    benchmark in `root` is rewritten with the same content (the generator is deterministic).

    Args:
        root (`str` or `Path`): the benchmark folder (`mapping_file.json`, `annotation_images/`).
        count (`int`, defaults to 24): how many samples.
        start (`int`, defaults to 0): the first held-out sample.
        resolution (`int`, defaults to 32): image side; 32 for the `shapes` model, 512 for a
            PIE-Bench-sized run of an SD 1.x model (the same pictures drawn larger).
    """
    root = Path(root)
    entries = {}
    for k, sample in enumerate(heldout_samples(count, start=start, resolution=resolution)):
        kind, folder = EDIT_TYPES[k % len(EDIT_TYPES)]
        key = f"{kind}{start + k:011d}"
        image_path = f"{folder}/{key}.png"
        target = root / "annotation_images" / image_path
        target.parent.mkdir(parents=True, exist_ok=True)
        sample.image.save(target)
        entries[key] = bench_entry(sample, kind, image_path)
    mapping = root / "mapping_file.json"
    with atomic_text(mapping) as handle:
        json.dump(entries, handle, indent=1)
    return mapping
