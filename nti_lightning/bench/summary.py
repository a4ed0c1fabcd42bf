"""Means of PIE-Bench's per-image scores, in the paper's units: overall and per edit type.

The paper's table gives the structure distance and LPIPS x10^3, the MSE x10^4, SSIM x10^2, and
PSNR and the CLIP similarities as they are. A mean leaves out the images whose value is `nan`
(the unedited-region metrics of whole-image masks, the style edits) and says how many it left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from nti_lightning.bench.metrics import METRICS

#: The factor from a raw value to the paper's unit.
PAPER_SCALE = {
    "structure_distance": 1e3,
    "psnr_unedited": 1.0,
    "lpips_unedited": 1e3,
    "mse_unedited": 1e4,
    "ssim_unedited": 1e2,
    "clip_whole": 1.0,
    "clip_edited": 1.0,
}

#: Column titles of the Markdown tables (the paper's).
TITLES = {
    "structure_distance": "distance x10^3",
    "psnr_unedited": "PSNR",
    "lpips_unedited": "LPIPS x10^3",
    "mse_unedited": "MSE x10^4",
    "ssim_unedited": "SSIM x10^2",
    "clip_whole": "CLIP whole",
    "clip_edited": "CLIP edited",
}

#: PIE-Bench's `editing_type_id`s.
EDIT_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute (content)",
    "5": "change attribute (pose)",
    "6": "change attribute (colour)",
    "7": "change attribute (material)",
    "8": "change background",
    "9": "change style",
}

#: The group holding every image.
ALL = "all"


@dataclass(frozen=True)
class MetricMean:
    """One metric's mean over a group of images.

    Attributes:
        mean (`float`): in the paper's unit; `nan` when no image has a value.
        count (`int`): images in the mean.
        nan (`int`): images left out because their value is undefined (`nan`).
    """

    mean: float
    count: int
    nan: int


Row = Mapping[str, object]
Summary = dict[str, dict[str, dict[str, Optional[MetricMean]]]]


def _type_order(group: str) -> tuple:
    return (0, int(group)) if group.isdigit() else (1, group)


def summarize(rows: Iterable[Row], metrics: Sequence[str] = METRICS) -> Summary:
    """Means per method, overall (`"all"`) and per `editing_type_id`.

    Args:
        rows (`Iterable[Mapping]`): per-image rows with "method", "editing_type_id" and one value
            per metric: a float (`nan` when undefined) or `None` when the metric is unavailable.
        metrics (`Sequence[str]`, defaults to `METRICS`): the metrics to average.

    Returns:
        `dict`: method -> group ("all", then "0".."9" as present) -> metric -> `MetricMean`, or
        `None` for a metric no row has a value or `nan` for (unavailable).
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in rows:
        groups = values.setdefault(str(row["method"]), {ALL: {}})
        for group in (ALL, str(row["editing_type_id"])):
            per_metric = groups.setdefault(group, {})
            for metric in metrics:
                value = row.get(metric)
                if value is not None:
                    per_metric.setdefault(metric, []).append(float(value))
    summary: Summary = {}
    for method, groups in values.items():
        summary[method] = {}
        for group in sorted(groups, key=_type_order):
            summary[method][group] = {}
            for metric in metrics:
                found = groups[group].get(metric)
                if found is None:
                    summary[method][group][metric] = None
                    continue
                defined = [v for v in found if not math.isnan(v)]
                mean = math.fsum(defined) / len(defined) * PAPER_SCALE.get(metric, 1.0) if defined else math.nan
                summary[method][group][metric] = MetricMean(mean, len(defined), len(found) - len(defined))
    return summary


def _cell(value: Optional[MetricMean]) -> str:
    if value is None:
        return "n/a"
    return "-" if math.isnan(value.mean) else f"{value.mean:.2f}"


def _nan_note(means: Mapping[str, Optional[MetricMean]]) -> int:
    return max((m.nan for m in means.values() if m is not None), default=0)


def _images(means: Mapping[str, Optional[MetricMean]]) -> int:
    return max((m.count + m.nan for m in means.values() if m is not None), default=0)


def markdown_summary(
    summary: Summary,
    metrics: Sequence[str] = METRICS,
    unavailable: Optional[Mapping[str, str]] = None,
    missing: Optional[Mapping[str, Sequence[str]]] = None,
    failed: Optional[Sequence[Mapping[str, str]]] = None,
) -> str:
    """The summary as Markdown: one table over all images, then one per method by edit type.

    Args:
        summary (`dict`): from `summarize`.
        metrics (`Sequence[str]`, defaults to `METRICS`): the columns.
        unavailable (`Mapping[str, str]`, *optional*): metric -> why it is "n/a", listed below.
        missing (`Mapping[str, Sequence[str]]`, *optional*): method -> ids without an output image.
        failed (`Sequence[Mapping[str, str]]`, *optional*): outputs that could not be scored, each with
            "method", "id" and "error" (the file and why); every one is listed below the tables.

    Returns:
        `str`: the Markdown text.
    """
    header = "| method | images | " + " | ".join(TITLES.get(m, m) for m in metrics) + " | left out (nan) |"
    rule = "|---|---:|" + "---:|" * len(metrics) + "---:|"
    lines = ["## PIE-Bench, all images", "", header, rule]
    for method, groups in summary.items():
        means = groups[ALL]
        cells = " | ".join(_cell(means.get(m)) for m in metrics)
        lines.append(f"| {method} | {_images(means)} | {cells} | {_nan_note(means)} |")
    for method, groups in summary.items():
        lines += ["", f"## {method}, by edit type", "", header.replace("| method |", "| edit type |"), rule]
        for group, means in groups.items():
            if group == ALL:
                continue
            name = f"{group} {EDIT_TYPES[group]}" if group in EDIT_TYPES else group
            cells = " | ".join(_cell(means.get(m)) for m in metrics)
            lines.append(f"| {name} | {_images(means)} | {cells} | {_nan_note(means)} |")
    lines += ["", "Units: distance and LPIPS x10^3, MSE x10^4, SSIM x10^2; PSNR in dB; CLIP as 100 x cosine. "
              "\"left out (nan)\": images whose unedited-region metrics are undefined (the mask covers the "
              "whole image), not in those means."]
    for metric, reason in (unavailable or {}).items():
        if metric in metrics:
            lines.append(f"- {TITLES.get(metric, metric)}: n/a, {reason}")
    for method, ids in (missing or {}).items():
        if ids:
            shown = ", ".join(list(ids)[:10]) + (", ..." if len(ids) > 10 else "")
            noun = "image" if len(ids) == 1 else "images"
            lines.append(f"- {method}: {len(ids)} {noun} without an output, not scored ({shown})")
    if failed:
        noun = "output" if len(failed) == 1 else "outputs"
        lines += ["", (f"**{len(failed)} {noun} could not be scored** (failed rows of the CSV; "
                       "fix or remove them and score again):")]
        # Each one, not a sample of them: the list is what the user has to fix.
        lines += [f"- {row['method']}, sample {row['id']}: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def log_tensorboard(summary: Summary, log_dir: Union[str, Path], markdown: Optional[str] = None,
                    grids: Optional[Mapping[str, "Image.Image"]] = None) -> None:
    """Writes the means as TensorBoard scalars (and the Markdown summary as text, and sample grids
    as images tagged `pie_bench_samples/<edit type>`).

    Scalars are tagged `pie_bench/<metric>/<method>` (all images) and
    `pie_bench_by_type/<metric>/<method>/<type>`; undefined means are skipped.

    Args:
        summary (`dict`): from `summarize`.
        log_dir (`str` or `Path`): the event files' folder.
        markdown (`str`, *optional*): logged as text under `pie_bench/summary`.
        grids (`Mapping[str, PIL.Image]`, *optional*): a picture per edit type (see `sample_grids`).
    """
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for method, groups in summary.items():
            for group, means in groups.items():
                for metric, mean in means.items():
                    if mean is None or math.isnan(mean.mean):
                        continue
                    tag = (
                        f"pie_bench/{metric}/{method}"
                        if group == ALL
                        else f"pie_bench_by_type/{metric}/{method}/{group}"
                    )
                    writer.add_scalar(tag, mean.mean, 0)
        if markdown:
            writer.add_text("pie_bench/summary", markdown, 0)
        for edit_type, grid in (grids or {}).items():
            writer.add_image(f"pie_bench_samples/{edit_type}", np.asarray(grid.convert("RGB")), 0, dataformats="HWC")
    finally:
        writer.close()
