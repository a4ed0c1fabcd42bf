#!/usr/bin/env python
"""What one UNet call costs, by the number of latents (rows) in it: the price list of batching.

Null-text inversion makes two kinds of UNet call: forward only, without grad (the pivot, each
step's conditional output, the guided advance) and forward + backward to the null embedding
(one per inner iteration; the weights are frozen, so the backward reaches the embedding only).
How a call's time grows with its rows decides what batching can win on a device: where a call
costs about the same for 1 row as for 8 (a small model, a CPU), the number of calls is what
counts; where time grows with rows (a large model on a GPU), the number of rows is.

    python benchmarks/unet_call_cost.py --model shapes --device cpu --threads 2
    python benchmarks/unet_call_cost.py --model sd15-random --device cuda --rows 1 8 16

It prints a Markdown table: rows, milliseconds per forward call, per forward + backward call,
and both per row. Each size is timed `--repeat` times after `--warmup` untimed calls; the median
is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

# The inversion benchmark's parts (`inversion_bench/`) sit beside this file; importing them puts
# the repository on the path as well, so they come before `nti_lightning`.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from inversion_bench.inputs import build_pipeline  # noqa: E402
from inversion_bench.measure import synchronize  # noqa: E402

from nti_lightning.diffusion.guidance import predict  # noqa: E402
from nti_lightning.models.text import PromptEncoder  # noqa: E402


def time_calls(call, device: torch.device, warmup: int, repeat: int) -> float:
    """Median seconds of `call()` over `repeat` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    synchronize(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(model: str, device: torch.device, rows: Sequence[int], warmup: int, repeat: int) -> list[dict[str, float]]:
    """Forward and forward + backward milliseconds for each number of rows."""
    pipeline = build_pipeline(model, device)
    unet = pipeline.unet.requires_grad_(False).eval()  # as in inversion: only the null embedding learns
    encoder = PromptEncoder.of(pipeline)
    cond = encoder.encode(["a photograph"]).to(device)
    null = encoder.null().to(device)
    size = unet.config.sample_size
    results = []
    for count in rows:
        generator = torch.Generator(device="cpu").manual_seed(count)
        latents = torch.randn(count, unet.config.in_channels, size, size, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (count,), generator=generator).to(device)
        condition = cond.expand(count).clone()

        @torch.no_grad()
        def forward() -> None:
            predict(unet, latents, timesteps, condition)

        tunable = null.expand(count).clone()
        embedding = tunable.embeddings.requires_grad_()

        def forward_backward() -> None:
            output = predict(unet, latents, timesteps, tunable.with_tunable(embedding, *tunable.tunable()[1:]))
            output.square().mean().backward()
            embedding.grad = None

        f = time_calls(forward, device, warmup, repeat) * 1000
        fb = time_calls(forward_backward, device, warmup, repeat) * 1000
        results.append({"rows": count, "forward_ms": f, "forward_backward_ms": fb})
    return results


def markdown(results: Sequence[dict[str, float]]) -> str:
    lines = [
        "| rows | forward ms | forward ms/row | forward+backward ms | forward+backward ms/row |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']} | {r['forward_ms']:.1f} | {r['forward_ms'] / r['rows']:.2f} "
            f"| {r['forward_backward_ms']:.1f} | {r['forward_backward_ms'] / r['rows']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="a benchmark_inversion.py model name (shapes)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (cuda when available, else cpu)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24], help="call sizes (1 2 4 8 16 24)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per size (3)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per size (20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = measure(args.model, device, args.rows, args.warmup, args.repeat)
    print(f"UNet call cost, {args.model} on {device} ({torch.get_num_threads()} threads):\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
