"""The benchmark's record: one row per timing, the Markdown table, and where the numbers were taken.

`recorded_baseline` reads the baseline rows of an earlier run's JSON line (`--baseline-from`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

import nti_lightning
from inversion_bench import REPO_ROOT
from inversion_bench.configurations import MODES
from inversion_bench.measure import Timing


def _bytes(value: Optional[float]) -> str:
    if value is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def recorded_baseline(path: str, device_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The baseline rows of the latest record in `path` taken on the same model, device, T, N and w.

    A long benchmark can so be split into several runs (subsets of `--configs`) that all compare
    with one measurement of the slow baseline.

    Args:
        path (`str`): a JSON-lines file written by `--output`.
        device_name (`str`): this run's device, as `environment` names it.
        args (`argparse.Namespace`): this run's `model`, `steps`, `inner_steps`, `guidance_scale`, `modes`.
    """
    wanted = (args.model, device_name, args.steps, args.inner_steps, args.guidance_scale)
    found: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        keys = ("model", "device", "num_inference_steps", "num_inner_steps", "guidance_scale")
        if tuple(record.get(key) for key in keys) != wanted:
            continue
        rows = [
            dict(row, configuration="baseline (recorded)", recorded=record.get("date"))
            for row in record.get("rows", [])
            if row["configuration"] == "baseline" and row["mode"] in args.modes
        ]
        found = rows or found  # the latest matching record wins
    return found


def summarise(
    timings: Sequence[Timing], batch_size: int, recorded: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """One row per timing, with the speed-up over the baseline of the same mode.

    Args:
        timings (sequence of `Timing`): the baseline's first, then the package's.
        batch_size (`int`): the images of a run; a baseline timed on fewer stands for all (per-image time).
        recorded (sequence of `dict`, defaults to none): baseline rows of an earlier run
            (`recorded_baseline`), used for the modes this run did not time the baseline in.
    """
    baseline = {t.mode: t.seconds_per_image for t in timings if t.configuration == "baseline"}
    rows = [dict(row) for row in recorded if row["mode"] not in baseline]
    baseline.update({row["mode"]: row["seconds_per_image"] for row in rows})
    for timing in timings:
        reference = baseline.get(timing.mode)
        rows.append(
            {
                "configuration": timing.configuration,
                "mode": timing.mode,
                "early_stop_epsilon": MODES[timing.mode],
                "images": timing.images,
                "concurrent_images": timing.concurrent,
                # A baseline run on fewer images is extrapolated to B at its per-image time.
                "extrapolated_seconds_for_batch": timing.seconds_per_image * batch_size,
                "seconds": timing.seconds,
                "seconds_of_repeats": timing.all_seconds or [timing.seconds],
                "seconds_per_image": timing.seconds_per_image,
                "images_per_second": 1.0 / timing.seconds_per_image,
                "speedup_vs_baseline": reference / timing.seconds_per_image if reference else None,
                "peak_memory_bytes": timing.peak_memory,
                "memory_before_bytes": timing.memory_before,
                "peak_memory_per_image_bytes": timing.memory_per_image,
                "peak_memory_kind": timing.memory_kind,
                "inner_iterations_per_image": float(np.mean(timing.iterations)),
                "unet_rows_per_image": timing.unet_rows / timing.images,
                "unet_rows": timing.unet_rows,
                "inner_iterations": timing.iterations,
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], batch_size: int) -> str:
    """The rows as a Markdown table (see BENCHMARKS.md for the columns)."""
    lines = [
        "| configuration | mode | images | seconds | s/image | images/s | speed-up | peak memory "
        "| memory/image | iterations/image | UNet rows/image |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        images = str(row["images"]) if row["images"] == batch_size else f"{row['images']} of {batch_size}"
        speedup = "—" if row["speedup_vs_baseline"] is None else f"{row['speedup_vs_baseline']:.2f}x"
        lines.append(
            f"| {row['configuration']} | {row['mode']} | {images} | {row['seconds']:.3f} | "
            f"{row['seconds_per_image']:.3f} | {row['images_per_second']:.3f} | {speedup} | "
            f"{_bytes(row['peak_memory_bytes'])} | {_bytes(row['peak_memory_per_image_bytes'])} | "
            f"{row['inner_iterations_per_image']:.1f} | {row.get('unet_rows_per_image', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        threads = torch.get_num_threads()
        name = f"{name} ({threads} thread{'s' if threads > 1 else ''})"
    import diffusers
    import lightning
    import transformers

    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        "git_commit": _git("rev-parse", "HEAD"),
        # Local changes make the commit an approximate label; say so (None: not a git checkout).
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "nti_lightning": nti_lightning.__version__,
    }


def _git(*command: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
