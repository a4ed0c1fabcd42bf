"""Scoring a folder of PIE-Bench outputs: one row per image and method, and their means.

The benchmark (`root`) is PIE-Bench's `PIE-Bench_v1` folder: `mapping_file.json` and the source
images under `annotation_images/<image_path>`. The outputs are in its authors' layout:
`<outputs>/<method>/annotation_images/<image_path>`, each a strip of panels of the source's height
whose last square panel is the edit (PnPInversion writes [prompt | source | reconstruction | edit],
2048 x 512). `nti bench --score OUTPUTS --bench.root ROOT` runs `score_folder` from the command line.

An output that cannot be read, is not an image or has the wrong size is a failed row (its file and
why, in the CSV's `error` column and listed under the tables); the others are scored, and `nti bench`
then exits with status 1 (`EXIT_SOME_FAILED`), as `nti fit` does with failed images. What belongs to
the benchmark itself (its mapping file, a source image, a mask) must be usable: a fault there stops it.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from nti_lightning.bench.metrics import (
    METRICS,
    as_array,
    clip_image_features,
    clip_similarity,
    clip_text_features,
    dino_self_similarity,
    lpips_unedited,
    mse_unedited,
    psnr_unedited,
    ssim_unedited,
    structure_distance,
)
from nti_lightning.bench.options import parse_score_args
from nti_lightning.bench.summary import (
    Summary,
    log_tensorboard,
    markdown_summary,
    summarize,
)
from nti_lightning.bench.weights import (
    CLIP_DEFAULT,
    DINO_DEFAULT,
    LPIPS_DEFAULT,
    BenchNetworks,
    load_networks,
)
from nti_lightning.data.pie_bench import EDIT_TYPES, BenchSample, read_mapping
from nti_lightning.data.pie_masks import decode_mask
from nti_lightning.errors import BenchmarkError, InputNotFoundError, OptionError
from nti_lightning.storage.atomic import atomic_text

MAPPING_FILE = "mapping_file.json"
IMAGES = "annotation_images"
#: Columns of the per-image CSV, in order; `error` is empty in a scored row and says why in a failed one.
COLUMNS = ("id", "method", "editing_type_id", *METRICS, "error")


def read_samples(root: Union[str, Path], edit_types: Optional[Sequence[str]] = None) -> list[BenchSample]:
    """The samples of `root/mapping_file.json` (`pie.read_mapping`), in the file's order.

    Args:
        root (`str` or `Path`): the benchmark folder.
        edit_types (`Sequence[str]`, *optional*): keep only these `editing_type_id`s.

    Raises:
        `InputNotFoundError`: no mapping file; `BenchmarkError`: it is not the benchmark's JSON, or
        an entry cannot be scored (the benchmark's own annotations must all be usable).
    """
    path = Path(root) / MAPPING_FILE
    if not path.is_file():
        raise InputNotFoundError(
            f"{path}: no PIE-Bench mapping file (bench.root must be the folder holding {MAPPING_FILE} and {IMAGES}/)"
        )
    samples, unusable = read_mapping(path)
    if unusable:
        raise BenchmarkError(
            "; ".join(reason for _, reason in unusable[:3])
            + (f" (and {len(unusable) - 3} more)" if len(unusable) > 3 else "")
        )
    return [sample for sample in samples if edit_types is None or sample.editing_type_id in edit_types]


def _open(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise InputNotFoundError(f"{path}: {what} not found") from error
    except (OSError, UnidentifiedImageError) as error:
        raise BenchmarkError(f"{path}: cannot read the {what} ({error})") from error


def read_edit(path: Path, shape: tuple[int, ...], sample: str) -> np.ndarray:
    """The edit panel of the output image at `path`, as (H, W, 3) uint8 of the source's `shape`.

    Args:
        path (`Path`): a method's output image.
        shape (`tuple[int, ...]`): the source image's array shape, (H, W, 3).
        sample (`str`): the sample's id, named in errors.

    Raises:
        `BenchmarkError` (or `InputNotFoundError` when it vanished) naming `path`: it cannot be read, is
        not an image, holds no square last panel, or its edit panel is not the source's size.
    """
    try:
        output = _open(path, f"output of sample {sample}")
    except Image.DecompressionBombError as error:  # not an OSError: a picture too large to be one of these
        raise BenchmarkError(f"{path}: cannot read the output of sample {sample} ({error})") from error
    try:
        edit = as_array(edit_panel(output, sample))
    except BenchmarkError as error:
        raise BenchmarkError(f"{path}: {error}") from error
    if edit.shape != shape:
        raise BenchmarkError(f"{path}: the edit panel is {edit.shape[1]}x{edit.shape[0]}, "
                             f"the source {shape[1]}x{shape[0]} (sample {sample})")
    return edit


def edit_panel(output: Image.Image, sample: Optional[str] = None) -> Image.Image:
    """The edit in an output image: the last H columns of an H-tall strip (a square image as is).

    Args:
        output (`PIL.Image.Image`): a method's output.
        sample (`str`, *optional*): the sample's id, named in errors.

    Raises:
        `BenchmarkError`: the image is taller than wide, so it holds no square last panel.
    """
    width, height = output.size
    if width < height:
        raise BenchmarkError(
            f"sample {sample}: the output is {width}x{height}; expected a strip at least as wide as tall"
        )
    return output if width == height else output.crop((width - height, 0, width, height))


def find_methods(outputs: Union[str, Path]) -> dict[str, Path]:
    """Every `<method>/annotation_images` folder under `outputs` (or `outputs` itself when it is one
    method's folder), by method name, sorted.

    Args:
        outputs (`str` or `Path`): the outputs folder.

    Raises:
        `InputNotFoundError`: `outputs` is not a folder, or holds no method.
    """
    outputs = Path(outputs)
    if not outputs.is_dir():
        raise InputNotFoundError(f"{outputs}: no such outputs folder")
    if (outputs / IMAGES).is_dir():
        return {outputs.resolve().name: outputs / IMAGES}
    found = {child.name: child / IMAGES for child in sorted(outputs.iterdir()) if (child / IMAGES).is_dir()}
    if not found:
        raise InputNotFoundError(f"{outputs}: no <method>/{IMAGES}/ folder inside (the PIE-Bench output layout)")
    return found


@dataclass
class _SourceCache:
    """What depends on the source image and prompt only, computed once for all methods."""

    dino_similarity: Optional[object] = None
    text_features: Optional[object] = None


def score_sample(networks: BenchNetworks, source: np.ndarray, edit: np.ndarray, mask: np.ndarray, editing_prompt: str,
                 cache: Optional[_SourceCache] = None) -> dict[str, Optional[float]]:
    """Every metric of one edit: a float, `nan` when undefined, `None` when its network is unavailable.

    Args:
        networks (`BenchNetworks`): from `weights.load_networks`.
        source (`np.ndarray`): the source image, (H, W, 3) uint8.
        edit (`np.ndarray`): the edit, the same shape.
        mask (`np.ndarray`): (H, W) 0/1, from `decode_mask`.
        editing_prompt (`str`): the target prompt, brackets removed.
        cache (`_SourceCache`, *optional*): the source's DINO self-similarity and the prompt's
            CLIP embedding, filled on first use and reused by later calls with the same source
            and prompt (one per sample, shared by its methods); computed afresh when not given.
    """
    cache = cache if cache is not None else _SourceCache()
    device = networks.device
    scores: dict[str, Optional[float]] = dict.fromkeys(METRICS)
    if networks.dino is not None:
        if cache.dino_similarity is None:
            cache.dino_similarity = dino_self_similarity(networks.dino, source)
        scores["structure_distance"] = structure_distance(
            networks.dino, source, edit, source_similarity=cache.dino_similarity
        )
    scores["psnr_unedited"] = psnr_unedited(source, edit, mask, device)
    if networks.lpips is not None:
        scores["lpips_unedited"] = lpips_unedited(networks.lpips, source, edit, mask, device)
    scores["mse_unedited"] = mse_unedited(source, edit, mask, device)
    scores["ssim_unedited"] = ssim_unedited(source, edit, mask, device)
    if networks.clip is not None:
        if cache.text_features is None:
            cache.text_features = clip_text_features(networks.clip, networks.clip_tokenizer, editing_prompt)
        whole = clip_image_features(networks.clip, networks.clip_image_processor, edit)
        edited = clip_image_features(networks.clip, networks.clip_image_processor, edit, mask)
        scores["clip_whole"] = clip_similarity(whole, cache.text_features)
        scores["clip_edited"] = clip_similarity(edited, cache.text_features)
    return scores


@dataclass
class BenchScores:
    """What `score_folder` found.

    Attributes:
        rows (`list[dict]`): one per image and method, keys `COLUMNS`.
        summary (`dict`): `summary.summarize(rows)`.
        unavailable (`dict[str, str]`): metric -> why it is "n/a".
        missing (`dict[str, list[str]]`): method -> ids with no output image.
        markdown (`str`): the summary tables.
        written (`list[Path]`): the files written.
        failed (`list[dict]`): one per output that could not be scored, keys "id", "method",
            "editing_type_id" and "error" (the file and why); in the CSV too, not in `rows` or the means.
    """

    rows: list
    summary: Summary
    unavailable: dict
    missing: dict
    markdown: str
    written: list = field(default_factory=list)
    failed: list = field(default_factory=list)


def _csv_value(value: object) -> object:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def write_rows(rows: Sequence[dict], path: Union[str, Path]) -> Path:
    """Writes the per-image rows as CSV (`COLUMNS`; "nan" undefined, "n/a" unavailable), atomically.

    A failed row (one with an "error") has empty metric cells: it has no value, not an undefined one.

    Args:
        rows (`Sequence[dict]`): `BenchScores.rows`, and the `BenchScores.failed` rows among them.
        path (`str` or `Path`): the CSV file; its folder is created.

    Returns:
        `Path`: `path`.
    """
    path = Path(path)
    with atomic_text(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            if row.get("error"):
                writer.writerow({key: row.get(key, "") for key in ("id", "method", "editing_type_id", "error")})
            else:
                writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS if key != "error"})
    return path


#: Samples per edit type shown in TensorBoard's grids.
GRID_SAMPLES = 2
#: Largest side of a panel in those grids.
GRID_PANEL = 256


def sample_grids(
    shown: dict[str, list[tuple[str, list[Optional[np.ndarray]]]]], methods: Sequence[str]
) -> dict[str, Image.Image]:
    """One picture per edit type: a row per sample, its source then each method's edit (grey where
    a method has none), labelled, panels at most `GRID_PANEL` px."""
    from nti_lightning.editing.pictures import labelled_grid

    grids = {}
    for edit_type, entries in shown.items():
        first = Image.fromarray(entries[0][1][0])
        first.thumbnail((GRID_PANEL, GRID_PANEL))
        images, labels = [], []
        for sample_id, panels in entries:
            for label, panel in zip([f"source {sample_id}", *methods], panels):
                picture = Image.new("RGB", first.size, (128, 128, 128)) if panel is None else Image.fromarray(panel)
                images.append(
                    picture.resize(first.size, Image.Resampling.BICUBIC) if picture.size != first.size else picture
                )
                labels.append(label)
        grids[f"{edit_type} {EDIT_TYPES.get(edit_type, '')}".strip()] = labelled_grid(
            images, labels, columns=1 + len(methods)
        )
    return grids


def score_folder(root: Union[str, Path], outputs: Union[str, Path], methods: Optional[Sequence[str]] = None, *,
                 networks: Optional[BenchNetworks] = None, dino: Optional[str] = DINO_DEFAULT,
                 clip: Optional[str] = CLIP_DEFAULT, lpips: Optional[str] = LPIPS_DEFAULT, device: Optional[str] = None,
                 edit_types: Optional[Sequence[str]] = None, csv_path: Union[str, Path, None] = None,
                 markdown_path: Union[str, Path, None] = None, tensorboard_dir: Union[str, Path, None] = None,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> BenchScores:
    """Scores every method's outputs against PIE-Bench.

    Args:
        root (`str` or `Path`): the benchmark folder (`mapping_file.json`, `annotation_images/`).
        outputs (`str` or `Path`): a folder of `<method>/annotation_images/<image_path>` outputs, or
            one method's folder.
        methods (`Sequence[str]`, *optional*): the methods to score; all found by default.
        networks (`BenchNetworks`, *optional*): already loaded networks; else loaded from `dino`,
            `clip`, `lpips` and `device` (see `weights.load_networks`).
        dino (`str`, *optional*, defaults to "facebook/dino-vitb8"): DINO ViT-B/8's folder or cached
            hub id; `None` or "none" turns the structure distance off.
        clip (`str`, *optional*, defaults to "openai/clip-vit-large-patch14"): CLIP's folder or cached
            hub id; `None` or "none" turns the CLIP similarities off.
        lpips (`str`, *optional*, defaults to "squeeze"): "squeeze" (the torch hub cache) or a torch
            hub folder; `None` or "none" turns LPIPS off.
        device (`str`, *optional*): "cuda" when there is a GPU and none is named, else "cpu".
        edit_types (`Sequence[str]`, *optional*): score only these `editing_type_id`s.
        csv_path (`str` or `Path`, *optional*): where to write the per-image rows.
        markdown_path (`str` or `Path`, *optional*): where to write the summary tables.
        tensorboard_dir (`str` or `Path`, *optional*): where to log the means for TensorBoard.
        progress (`Callable[[int, int, str], None]`, *optional*): called with (done, total, id)
            after each image.

    Returns:
        `BenchScores`. An image a method has no output for is not scored; it is listed in
        `missing` and in the Markdown summary. An output that cannot be read, is not an image or
        has the wrong size is not scored either: it is a row of `failed` (the file and why), in the
        CSV and listed under the tables, and the other outputs are scored.

    Raises:
        `NtiError`: the benchmark itself cannot be used (no mapping file, a damaged entry or mask, a
        source image that cannot be read), or `outputs` holds no method.
    """
    root = Path(root)
    samples = read_samples(root, edit_types)
    if not samples:
        raise OptionError(
            f"{root / MAPPING_FILE}: no sample to score"
            + (f" with editing_type_id in {', '.join(edit_types)}" if edit_types else "")
        )
    found = find_methods(outputs)
    if methods:
        unknown = [m for m in methods if m not in found]
        if unknown:
            raise OptionError(f"{outputs}: no outputs for method(s) {', '.join(unknown)}; found: {', '.join(found)}")
        found = {m: found[m] for m in methods}
    if networks is None:
        networks = load_networks(dino=dino, clip=clip, lpips=lpips, device=device)
    rows: list[dict] = []
    failed: list[dict] = []
    table: list[dict] = []  # the CSV's rows, scored and failed, in the mapping file's order
    missing: dict[str, list[str]] = {method: [] for method in found}
    shown: dict[
        str, list[tuple[str, list[Optional[np.ndarray]]]]
    ] = {}  # edit type -> (id, source and edits) for the grids
    for done, sample in enumerate(samples, 1):
        source = as_array(_open(root / IMAGES / sample.image_path, f"source image of sample {sample.id}"))
        mask = decode_mask(sample.mask, source.shape[:2], sample=sample.id)
        cache = _SourceCache()
        panels: Optional[list[Optional[np.ndarray]]] = None
        if len(shown.setdefault(sample.editing_type_id, [])) < GRID_SAMPLES:
            panels = [source]
            shown[sample.editing_type_id].append((sample.id, panels))
        for method, folder in found.items():
            path = folder / sample.image_path
            if not path.is_file():
                missing[method].append(sample.id)
                if panels is not None:
                    panels.append(None)
                continue
            row = {"id": sample.id, "method": method, "editing_type_id": sample.editing_type_id}
            try:
                edit = read_edit(path, source.shape, sample.id)
            except (BenchmarkError, InputNotFoundError) as error:
                # One bad output (a truncated write, a stray file) costs its row, not the other outputs' scores.
                failed.append({**row, "error": " ".join(str(error).split())})
                table.append(failed[-1])
                if panels is not None:
                    panels.append(None)
                continue
            if panels is not None:
                panels.append(edit)
            scores = score_sample(networks, source, edit, mask, sample.editing_prompt, cache)
            rows.append({**row, **scores})
            table.append(rows[-1])
        if progress is not None:
            progress(done, len(samples), sample.id)
    summary = summarize(rows)
    markdown = markdown_summary(summary, unavailable=networks.unavailable, missing=missing, failed=failed)
    result = BenchScores(rows, summary, dict(networks.unavailable), missing, markdown, failed=failed)
    if csv_path is not None:
        result.written.append(write_rows(table, csv_path))
    if markdown_path is not None:
        with atomic_text(Path(markdown_path)) as handle:
            handle.write(markdown)
        result.written.append(Path(markdown_path))
    if tensorboard_dir is not None:
        log_tensorboard(summary, tensorboard_dir, markdown, sample_grids(shown, list(found)))
        result.written.append(Path(tensorboard_dir))
    return result


def main(args: Optional[Sequence[str]] = None) -> BenchScores:
    """`nti bench --score OUTPUTS --bench.root ROOT [options]`: scores a folder of PIE-Bench outputs.

    Args:
        args (`Sequence[str]`, *optional*): the words after `nti bench`; the command line's by default.

    Returns:
        `BenchScores`, after writing the CSV and the Markdown summary (beside the outputs unless
        `--bench.output` / `--bench.summary` say otherwise) and printing the summary.
    """
    parsed = parse_score_args(list(sys.argv[1:] if args is None else args))
    options = parsed.bench
    outputs = Path(parsed.score)
    split = lambda text: [part.strip() for part in text.split(",") if part.strip()] if text else None  # noqa: E731

    def print_progress(done: int, total: int, key: str) -> None:
        if done % 50 == 0 or done == total:
            print(f"scored {done}/{total} ({key})", flush=True)

    result = score_folder(
        options.root, outputs, split(options.methods), dino=options.dino, clip=options.clip, lpips=options.lpips,
        device=options.device, edit_types=split(options.edit_types),
        csv_path=options.output or outputs / "pie_bench.csv", markdown_path=options.summary or outputs / "pie_bench.md",
        tensorboard_dir=options.tensorboard, progress=print_progress,
    )
    print(result.markdown)
    print("written: " + ", ".join(str(path) for path in result.written))
    return result
