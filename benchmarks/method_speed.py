"""Inversion and edit seconds per image of each inversion method, one image at a time against a batch.

    python benchmarks/method_speed.py --model shapes --steps 50 --batch-sizes 1 8
    python benchmarks/method_speed.py --model sd15-random --resolution 512 --steps 5 --batch-sizes 1 8 \\
        --methods null_text ddpm proxnpi edict

For each method and batch size B it inverts B random images (`nti.invert`, batch B, continuous
scheduling) and edits each with one target prompt (`edit_jobs_latents`: all B edits in one batch;
Prompt-to-Prompt's Replace where the method edits under a controller, the prompts alone for
EDICT), after an untimed warm-up of one image. It prints seconds per image for both, and appends
the record as one JSON line to `--output`. Per-image seconds scale with T (`--steps`): a few
steps measure the per-step cost of a large model on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

import nti_lightning as nti
from nti_lightning.editing import Replace
from nti_lightning.editing.edit import EditJob, edit_jobs_latents
from nti_lightning.inversion.methods import METHODS, REGISTRY

PROMPT, TARGET = "a red circle on a green background", "a blue circle on a green background"


def images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    return [Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def time_method(pipe: Any, method: str, batch: int, steps: int, inner_steps: int, size: int) -> dict[str, float]:
    """Seconds per image of inverting and of editing `batch` images together with `method`."""
    pictures = images(batch, size)
    started = time.perf_counter()
    inversions = nti.invert(pipe, pictures, PROMPT, method=method, num_inference_steps=steps,
                            num_inner_steps=inner_steps, batch_size=batch, progress_bar=False)
    invert_s = time.perf_counter() - started
    prompts = [PROMPT, TARGET]
    under_control = REGISTRY[method].edits_under_control
    jobs = [
        EditJob(inversion, prompts, Replace(prompts, pipe.tokenizer, 0.8, 0.6) if under_control else None)
        for inversion in inversions
    ]
    started = time.perf_counter()
    with torch.no_grad():
        edit_jobs_latents(pipe, jobs)
    edit_s = time.perf_counter() - started
    return {"method": method, "batch_size": batch, "invert_s_per_image": invert_s / batch,
            "edit_s_per_image": edit_s / batch}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="any model nti fit takes (shapes)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (the model's own)")
    parser.add_argument("--steps", type=int, default=50, help="T (50)")
    parser.add_argument("--inner-steps", type=int, default=10, help="N, Null-text's inner iterations (10)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="B values (1 8)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help="the methods (every one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    parser.add_argument("--output", default=None, help="append the record as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = nti.load_pipeline(args.model)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    for method in args.methods:
        time_method(pipe, method, 1, min(args.steps, 2), 1, size)  # warm-up: one-time costs
        for batch in args.batch_sizes:
            rows.append(time_method(pipe, method, batch, args.steps, args.inner_steps, size))
            row = rows[-1]
            print(f"{method:16s} B={batch:<3d} invert {row['invert_s_per_image']:8.2f} s/image   "
                  f"edit {row['edit_s_per_image']:8.2f} s/image", flush=True)
    return run_record({"model": args.model, "resolution": size, "steps": args.steps, "inner_steps": args.inner_steps},
                      rows, args.output)


def run_record(settings: dict[str, Any], rows: list[dict[str, Any]], output: Optional[str]) -> dict[str, Any]:
    """The run's record (date, `settings`, threads, device, commit, `rows`), appended as one JSON line
    to `output` when given (editor_speed.py writes its runs the same way)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    record = {"date": time.strftime("%Y-%m-%d"), **settings, "threads": torch.get_num_threads(),
              "device": platform.processor() or platform.machine(), "git_commit": commit, "rows": rows}
    if output:
        with open(output, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
