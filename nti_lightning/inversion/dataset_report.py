"""The report of a dataset run: one row per image, a summary per method, and the failures.

Written by rank 0 at the end of `nti fit` next to the artifacts:

* `report.csv` and `report.json`: per image its reconstruction PSNR/SSIM against the input and
  against the VAE round trip, the relative error of its latent, the DDIM-only baseline, inner
  iterations used and seconds; images
  skipped because a previous run finished them are included from their artifacts' metadata, so
  the report always covers the whole dataset;
* `failures.jsonl`: the entries that were not inverted, with their reasons.

`nti report DIR [DIR ...]` puts several runs (say, the three methods on one dataset) in one table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from nti_lightning.errors import InputNotFoundError, OptionError
from nti_lightning.storage.atomic import atomic_text

#: Columns of `report.csv`, in order.
COLUMNS = (
    "id",
    "method",
    "status",
    "psnr",
    "ssim",
    "vae_psnr",
    "vae_ssim",
    "psnr_vs_vae",
    "ddim_psnr",
    "ddim_ssim",
    "latent_error",
    "ddim_latent_error",
    "inner_iterations",
    "seconds",
    "prompt",
    "artifact",
)
#: Columns averaged per method in the summary.
AVERAGED = ("psnr", "ssim", "vae_psnr", "psnr_vs_vae", "ddim_psnr", "latent_error", "inner_iterations", "seconds")


def image_row(metadata: dict[str, Any], status: str, artifact: Optional[str]) -> dict[str, Any]:
    """The report row of one image from its artifact's metadata.

    Args:
        metadata (`dict`): the `Inversion`'s metadata, with "prompt".
        status (`str`): "done" (inverted by this run) or "skipped" (by an earlier one).
        artifact (`str`, *optional*): the artifact's path.
    """
    metrics = metadata.get("metrics") or {}
    return {
        "id": metadata.get("id"),
        "method": metadata.get("method", "null_text"),
        "status": status,
        **{name: metrics.get(name) for name in COLUMNS[3:12]},
        "inner_iterations": sum(metadata.get("inner_iterations") or []),
        "seconds": metadata.get("seconds"),
        "prompt": metadata.get("prompt"),
        "artifact": artifact,
    }


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: the number of images and the mean of each `AVERAGED` column."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    summary = {}
    for method, members in groups.items():
        summary[method] = {"images": float(len(members))}
        for column in AVERAGED:
            values = [float(row[column]) for row in members if _is_number(row.get(column))]
            summary[method][column] = sum(values) / len(values) if values else math.nan
    return summary


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """The summary as a Markdown table (printed, and shown in TensorBoard's text tab)."""
    header = ("method", "images", *AVERAGED)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in summary.items():
        cells = [method, f"{int(values['images'])}"] + [_format(values[column]) for column in AVERAGED]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    output_dir: str | Path, rows: Sequence[dict[str, Any]], failures: Sequence[dict[str, str]]
) -> dict[str, dict[str, float]]:
    """Writes `report.csv`, `report.json` and `failures.jsonl` into `output_dir` (each atomically)."""
    output_dir = Path(output_dir)
    rows = sorted(rows, key=lambda row: (row["method"], str(row["id"])))
    summary = summarize(rows)
    with atomic_text(output_dir / "report.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_text(output_dir / "report.json") as handle:
        json.dump({"summary": summary, "images": rows, "failures": list(failures)}, handle, indent=1, default=str)
    with atomic_text(output_dir / "failures.jsonl") as handle:
        handle.writelines(json.dumps(failure) + "\n" for failure in failures)
    return summary


def read_rows(directory: str | Path) -> list[dict[str, Any]]:
    """The image rows of the `report.json` of a finished run in `directory`."""
    path = Path(directory) / "report.json"
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no report (run `nti fit` with this output_dir first)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise OptionError(f"{path}: not an nti-lightning report ({error})") from error
    return rows


def main(args: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    """`nti report DIR [DIR ...] [--output FILE.csv]`: one table for several runs."""
    parser = argparse.ArgumentParser(prog="nti report", description=main.__doc__)
    parser.add_argument("directories", nargs="+", help="output_dir of each run")
    parser.add_argument("--output", help="also write every image row of every run to this CSV")
    options = parser.parse_args(args)
    rows = [row for directory in options.directories for row in read_rows(directory)]
    summary = summarize(rows)
    print(summary_table(summary))
    if options.output:
        with atomic_text(Path(options.output)) as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _format(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
