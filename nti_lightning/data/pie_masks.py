"""PIE-Bench's run-length masks: decoding them as its evaluator does, and writing them.

A mask is stored in `mapping_file.json` as a flat list `[start0, length0, start1, length1, ...]`
over the image flattened row-major (index = row * width + column). Decoding sets every run to 1,
cutting a run that would pass the last pixel at the end of the image, and then sets the one-pixel
border to 1 (the benchmark's authors do this "to avoid annotation errors in the boundary"). 1 marks
the region an edit may change; the unedited-region metrics look at `1 - mask`.
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence

import numpy as np

from nti_lightning.errors import BenchmarkError

#: The size of every PIE-Bench image (height, width).
PIE_BENCH_SIZE = (512, 512)


def _where(sample: str | None) -> str:
    return f"sample {sample}: " if sample is not None else ""


def decode_mask(runs: Sequence[int], size: tuple[int, int] = PIE_BENCH_SIZE, sample: str | None = None) -> np.ndarray:
    """The (height, width) mask of a run-length list, border included, as `uint8` 0/1.

    Args:
        runs (`Sequence[int]`): `[start0, length0, start1, length1, ...]` over the image flattened
            row-major. Runs may overlap or come in any order; a run longer than what is left of
            the image stops at its last pixel (the evaluator's `min(length, H * W - start)`).
        size (`tuple[int, int]`, defaults to `(512, 512)`): the image's (height, width).
        sample (`str`, *optional*): the sample's id, named in error messages.

    Returns:
        `np.ndarray` of shape `size`, dtype `uint8`: 1 inside a run or on the one-pixel border.

    Raises:
        `BenchmarkError`: an odd number of entries, a value that is not an integer, a start
            outside the image or a negative length (the evaluator would silently skip or wrap
            such a run; a benchmark file holding one is damaged).
    """
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise BenchmarkError(f"{_where(sample)}mask size {size} is not a positive (height, width)")
    total = height * width
    runs = list(runs)
    if len(runs) % 2:
        raise BenchmarkError(f"{_where(sample)}the mask has {len(runs)} entries; a run-length list has an even number")
    flat = np.zeros(total, dtype=np.uint8)
    for index in range(0, len(runs), 2):
        start, length = runs[index], runs[index + 1]
        # bool is an Integral too, but `True` as a start is a damaged file, not pixel 1.
        if any(isinstance(v, bool) or not isinstance(v, Integral) for v in (start, length)):
            raise BenchmarkError(
                f"{_where(sample)}mask run {index // 2} is ({start!r}, {length!r}); starts and lengths are integers"
            )
        if not 0 <= start < total:
            raise BenchmarkError(
                f"{_where(sample)}mask run {index // 2} starts at {start}, outside the {height}x{width} image "
                f"(0..{total - 1})"
            )
        if length < 0:
            raise BenchmarkError(f"{_where(sample)}mask run {index // 2} has a negative length {length}")
        flat[start : start + min(length, total - start)] = 1
    mask = flat.reshape(height, width)
    mask[0, :] = 1
    mask[-1, :] = 1
    mask[:, 0] = 1
    mask[:, -1] = 1
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """The run-length list of a (height, width) mask: `decode_mask` reads it back.

    Runs are the maximal stretches of nonzero pixels in row-major order, so a run may continue
    from the end of one row onto the next. `decode_mask(encode_mask(m), m.shape)` equals `m` with
    its border set to 1; for a mask whose border is already 1 (every decoded mask) it is `m`.

    Args:
        mask (`np.ndarray`): a 2-D array; nonzero (or `True`) marks the edited region.

    Returns:
        `list[int]`: `[start0, length0, ...]`, starts increasing, as plain Python ints (JSON-ready).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BenchmarkError(f"a mask to encode has shape {mask.shape}; it must be (height, width)")
    flat = np.concatenate(([0], (mask.reshape(-1) != 0).astype(np.int8), [0]))
    changes = np.flatnonzero(np.diff(flat))  # alternating run starts and run ends
    starts, ends = changes[0::2], changes[1::2]
    runs: list[int] = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        runs += [start, end - start]
    return runs
