#!/usr/bin/env python
"""Images per second of null-text inversion: the plain reference loop against `nti_lightning.invert`.

One run times, on the same B seeded random images and one prompt:

- the baseline: the test suite's reference loop (`tests/reference.py`), one image after another,
  fp32, with a host synchronisation (`.item()`) in every inner iteration;
- the package, all B images as one batch, once per named configuration (keyword options of
  `invert`, see `CONFIGURATIONS`);

each in two modes: every image runs all N inner iterations (ε = -1, nothing ever stops), and the
reference early stop (ε = 1e-5). It prints a Markdown table (seconds, images/s, speed-up over the
baseline in the same mode, peak memory, inner iterations used), the fidelity of every other
configuration to the fp32 one, and can append everything as one JSON line to a file.

    python benchmarks/benchmark_inversion.py --model tiny --device cpu --batch-size 8
    python benchmarks/benchmark_inversion.py --model sd15-random --device cuda --batch-size 8 \
        --baseline-images 2 --output benchmarks/results.jsonl
    python benchmarks/benchmark_inversion.py --model sdxl-random --device cuda --batch-size 1 \
        --configs bf16 bf16+checkpointing --output benchmarks/results.jsonl

SDXL models (`sdxl-random`, `tiny-xl`, an SDXL folder) are timed against the SDXL reference loop
(`tests/reference_xl.py`); `--resolution` runs `sdxl-random` at a smaller size (a CPU smoke run).

See BENCHMARKS.md for what the numbers mean.

The parts live beside this script, in `inversion_bench/` (see its docstring); this file is the
command line and the run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

# The parts (`inversion_bench/`) sit beside this file: importable whether it runs as a script or
# is loaded from its path. Importing them puts the repository and tests/ on the path as well, so
# they come before `nti_lightning`.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from inversion_bench.configurations import (  # noqa: E402
    CONFIGURATIONS,
    CUDA_ONLY_PRECISIONS,
    DEFAULT_PROMPT,
    MODES,
)
from inversion_bench.fidelity import fidelity_report  # noqa: E402
from inversion_bench.inputs import baseline_loop, build_pipeline, random_image  # noqa: E402
from inversion_bench.measure import Timing, time_baseline, time_package  # noqa: E402
from inversion_bench.report import (  # noqa: E402
    environment,
    markdown_table,
    recorded_baseline,
    summarise,
)

from nti_lightning.api import invert  # noqa: E402
from nti_lightning.data.images import prepare  # noqa: E402
from nti_lightning.demo.shapes import heldout_samples  # noqa: E402
from nti_lightning.models import vae as vae_codec  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (run with --help for every flag)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="tiny", help="tiny, sd15-random, sdxl-random, or a load_pipeline name/path (tiny)"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="image side for sdxl-random, a multiple of 8 (1024)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (cuda when available, else cpu)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="B, images inverted together (lockstep) or slots (continuous) (8)"
    )
    parser.add_argument(
        "--num-images", type=int, default=None, help="images inverted in each timed run (B): more than B runs batches"
    )
    parser.add_argument(
        "--images", choices=("random", "heldout"), default="random",
        help="random smooth images with --prompt (random), or the shapes model's held-out images with their "
        "captions (heldout: a model that converges, so early stopping happens as with real weights)",
    )
    parser.add_argument("--steps", type=int, default=50, help="T, DDIM steps (50)")
    parser.add_argument("--inner-steps", type=int, default=10, help="N, most inner iterations per step (10)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="w (7.5)")
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS), metavar="NAME",
        help=f"package configurations to time (all): {', '.join(CONFIGURATIONS)}",
    )
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
        help="full (all N iterations, ε = -1) and/or early-stop (ε = 1e-5) (both)",
    )
    parser.add_argument(
        "--baseline-images", type=int, default=None,
        help="time the baseline on this many of the B images and extrapolate per image (B); 0 skips it",
    )
    parser.add_argument(
        "--baseline-from", default=None, metavar="JSONL",
        help="for modes whose baseline this run does not time, use the latest matching record of this "
        "file (an earlier --output), e.g. with --baseline-images 0 to split a long benchmark into runs",
    )
    parser.add_argument("--warmup-steps", type=int, default=2, help="T of the untimed warm-up runs (2)")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="time every row this many times, in rounds, and keep the fastest (1); for noisy shared machines",
    )
    parser.add_argument("--no-fidelity", action="store_true", help="skip the comparison with the fp32 results")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="source prompt of every image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    parser.add_argument("--output", default=None, help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.inner_steps < 1 or args.repeats < 1:
        parser.error("--batch-size, --steps, --inner-steps and --repeats must be positive")
    if args.num_images is None:
        args.num_images = args.batch_size
    if args.num_images < 1:
        parser.error("--num-images must be positive")
    if args.baseline_images is None:
        args.baseline_images = args.num_images
    if not 0 <= args.baseline_images <= args.num_images:
        parser.error("--baseline-images must be between 0 and --num-images")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the benchmark, prints its tables, returns (and optionally appends) the JSON record.

    Args:
        argv (sequence of `str`, *optional*): command-line arguments; defaults to `sys.argv[1:]`.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning's, once per fit
            return run(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its own setting


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark for parsed arguments (see `parse_args`); returns the JSON record."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Lightning announces its accelerators on every fit; a benchmark runs many fits.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    env = environment(device)

    accepted = inspect.signature(invert).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    configurations, skipped = [], {}
    for name in args.configs:
        options = CONFIGURATIONS[name]
        missing = [] if takes_any else sorted(set(options) - set(accepted))
        if missing:
            skipped[name] = f"invert() takes no {', '.join(missing)}"
        elif options.get("precision") in CUDA_ONLY_PRECISIONS and device.type != "cuda":
            skipped[name] = f"precision {options['precision']} needs a CUDA device"
        else:
            configurations.append(name)
    for name, reason in skipped.items():
        print(f"note: skipping {name}: {reason}")

    start = time.perf_counter()
    pipeline = build_pipeline(args.model, device, args.resolution)
    resolution = vae_codec.resolution(pipeline.vae, pipeline.unet.config.sample_size)
    print(
        f"{args.model} on {device} ({resolution}x{resolution}) built in {time.perf_counter() - start:.1f} s; "
        f"{args.num_images} images ({args.images}), B={args.batch_size}, T={args.steps}, N={args.inner_steps}, "
        f"w={args.guidance_scale}"
    )
    if args.images == "heldout":
        samples = heldout_samples(args.num_images, start=args.seed, resolution=resolution)
        images, prompts = [sample.image for sample in samples], [sample.caption for sample in samples]
    else:
        images = [random_image(args.seed + i, resolution) for i in range(args.num_images)]
        prompts = [args.prompt] * args.num_images
    pixels = [prepare(image, resolution)[None].to(device) for image in images]

    jobs: list[Any] = []  # one callable per timed row
    if args.baseline_images:
        # Untimed warm-up: first calls pay one-time costs (allocator growth, kernel selection).
        baseline_loop(pipeline, num_ddim_steps=args.warmup_steps).invert(
            pixels[0], prompts[0], num_inner_steps=1, epsilon=-1.0
        )
        for mode in args.modes:
            jobs.append(
                lambda mode=mode: time_baseline(
                    pipeline, pixels[: args.baseline_images], prompts[: args.baseline_images], mode, args, device
                )
            )
    for name in configurations:
        # Each configuration has its own one-time costs (compilation, autocast kernels), paid by
        # a short untimed walk on the same batch shape.
        time_package(
            pipeline, images[: args.batch_size], prompts[: args.batch_size], name, args.modes[0], args, device,
            num_inference_steps=args.warmup_steps, num_inner_steps=min(2, args.inner_steps),
        )
        for mode in args.modes:
            jobs.append(lambda name=name, mode=mode: time_package(pipeline, images, prompts, name, mode, args, device))
    # With --repeats, every row is timed once per round, rounds one after the other (so a slow
    # spell of a shared machine hits all rows alike), and each row keeps its fastest run.
    timings: list[Timing] = []
    for round_ in range(args.repeats):
        for k, job in enumerate(jobs):
            timing = job()
            if round_ == 0:
                timing.all_seconds = [timing.seconds]
                timings.append(timing)
            else:
                seconds = timings[k].all_seconds + [timing.seconds]
                if timing.seconds < timings[k].seconds:
                    timings[k] = timing
                timings[k].all_seconds = seconds

    recorded = []
    if args.baseline_from:
        recorded = recorded_baseline(args.baseline_from, env["device"], args)
        if not recorded:
            print(f"note: {args.baseline_from} has no baseline for this model, device, T, N and w")
    rows = summarise(timings, args.num_images, recorded)
    print()
    print(f"Null-text inversion, {args.model} on {env['device']}: "
          f"B={args.batch_size}, T={args.steps}, N={args.inner_steps}; modes: full = all N iterations "
          f"(ε = -1), early-stop = ε 1e-5. Baseline: the reference loop, one image at a time.")
    print()
    print(markdown_table(rows, args.num_images))

    fidelities = fidelity_report(pipeline, timings, args) if not args.no_fidelity else {}
    record = {
        **env,
        "model": args.model,
        "resolution": resolution,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "images": args.images,
        "num_inference_steps": args.steps,
        "num_inner_steps": args.inner_steps,
        "guidance_scale": args.guidance_scale,
        "baseline_images": args.baseline_images,
        "prompt": args.prompt,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "configurations": {name: CONFIGURATIONS[name] for name in configurations},
        "skipped": skipped,
        "rows": rows,
        "fidelity": fidelities,
    }
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(json.dumps(record, default=str) + "\n")
        print(f"\nappended to {path}")
    return record


if __name__ == "__main__":
    main()
