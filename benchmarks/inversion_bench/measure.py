"""Timing one run: the baseline loop or `nti_lightning.invert`, its wall clock, peak memory and UNet rows.

`time_baseline` and `time_package` each return a `Timing`; `PeakMemory` and `counted_unet_rows`
are what they measure with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from inversion_bench.configurations import CONFIGURATIONS, MODES
from inversion_bench.inputs import baseline_loop
from nti_lightning.api import invert
from nti_lightning.inversion.artifact import Inversion


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(key: str) -> Optional[int]:
    """A `kB` field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory during one timed run, and what was already in use when it started.

    On CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`), reset per run.
    On a CPU: the process's peak resident set size. Linux lets the high-water mark be reset
    (writing 5 to /proc/self/clear_refs), so each run gets its own peak; where that fails, it is
    `getrusage`'s `ru_maxrss`, the peak over the whole process so far (`per_run` is then False).

    Args:
        device (`torch.device`): the device the run uses.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0
        self.per_run = True

    def start(self) -> None:
        """Resets the peak; call right before the run."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.per_run = _proc_status_bytes("VmHWM") is not None
        except OSError:
            self.per_run = False
        self.before = _proc_status_bytes("VmRSS") or 0

    @property
    def kind(self) -> str:
        """What `peak` measures, for the record."""
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "VmHWM, reset per run" if self.per_run else "ru_maxrss, whole process"

    def peak(self) -> int:
        """Peak bytes since `start` (see the class note for the CPU without a resettable peak)."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.per_run:
            return _proc_status_bytes("VmHWM") or 0
        import resource  # POSIX only, and only needed here

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


@dataclass
class Timing:
    """One timed run.

    Args:
        configuration (`str`): "baseline" or a key of `CONFIGURATIONS`.
        mode (`str`): a key of `MODES`.
        images (`int`): images inverted in the timed run.
        concurrent (`int`): images in memory at once (1 for the baseline, B for the package).
        seconds (`float`): wall-clock time of the run.
        peak_memory (`int`): peak bytes during the run (see `PeakMemory`).
        memory_before (`int`): bytes in use when the run started (weights, earlier results).
        iterations (`list[int]`): inner Adam iterations each image used, summed over the steps.
        memory_kind (`str`): what `peak_memory` measures (`PeakMemory.kind`).
        results (`list`): the package's `Inversion`s (kept for the fidelity check), else empty.
        unet_rows (`int`): latents the UNet processed in the run (a batch of k counts k), forward
            passes only (each inner iteration's backward follows its forward).
        all_seconds (`list[float]`): with `--repeats`, the time of every repeat (this timing is
            the fastest).
    """

    configuration: str
    mode: str
    images: int
    concurrent: int
    seconds: float
    peak_memory: int
    memory_before: int
    iterations: list[int]
    memory_kind: str
    results: list[Inversion] = field(default_factory=list, repr=False)
    unet_rows: int = 0
    all_seconds: list[float] = field(default_factory=list)  # every repeat's time (`--repeats`)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images

    @property
    def memory_per_image(self) -> float:
        """Peak memory above what was in use at the start, per image held at once."""
        return max(self.peak_memory - self.memory_before, 0) / self.concurrent


def time_baseline(
    pipeline: StableDiffusionPipeline,
    pixels: Sequence[torch.Tensor],
    prompts: Sequence[str],
    mode: str,
    args: argparse.Namespace,
    device: torch.device,
) -> Timing:
    """Times the reference loop on `pixels`, one image after another.

    Args:
        pipeline (`StableDiffusionPipeline`): fp32 pipeline on `device`.
        pixels (sequence of `torch.Tensor`): `[1, 3, H, W]` inputs in [-1, 1] on `device`.
        prompts (sequence of `str`): their source prompts.
        mode (`str`): a key of `MODES`.
        args (`argparse.Namespace`): `steps`, `inner_steps`, `guidance_scale`.
        device (`torch.device`): the device everything runs on.
    """
    loop = baseline_loop(pipeline, num_ddim_steps=args.steps, guidance_scale=args.guidance_scale)
    memory = PeakMemory(device)
    iterations = []
    memory.start()
    start = time.perf_counter()
    with counted_unet_rows(pipeline.unet) as rows:
        for image, prompt in zip(pixels, prompts):
            result = loop.invert(image, prompt, num_inner_steps=args.inner_steps, epsilon=MODES[mode])
            iterations.append(sum(result["inner_iterations"]))
        synchronize(device)
    seconds = time.perf_counter() - start
    return Timing(
        "baseline", mode, len(pixels), 1, seconds, memory.peak(), memory.before, iterations, memory.kind,
        unet_rows=rows[0],
    )


@contextlib.contextmanager
def counted_unet_rows(unet: torch.nn.Module) -> Any:
    """Counts the latents the UNet processes inside the block (a one-element list, filled in)."""
    rows = [0]

    def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        rows[0] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def time_package(
    pipeline: StableDiffusionPipeline,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    configuration: str,
    mode: str,
    args: argparse.Namespace,
    device: torch.device,
    **overrides: Any,
) -> Timing:
    """Times `nti_lightning.invert` on all `images` as one batch.

    Args:
        pipeline (`StableDiffusionPipeline`): fp32 pipeline on `device`.
        images (sequence of PIL images): the inputs, at the model's resolution.
        prompts (sequence of `str`): their source prompts.
        configuration (`str`): a key of `CONFIGURATIONS`; its options go to `invert`.
        mode (`str`): a key of `MODES`.
        args (`argparse.Namespace`): `steps`, `inner_steps`, `guidance_scale`.
        device (`torch.device`): the device everything runs on.
        **overrides: `invert` arguments that replace the ones above (the warm-up's shorter walk).
    """
    options = dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_inner_steps=args.inner_steps,
        early_stop_epsilon=MODES[mode],
        batch_size=args.batch_size,  # B images (lockstep) or slots (continuous) at once
        accelerator=_accelerator(device),
        **CONFIGURATIONS[configuration],
    )
    options.update(overrides)
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    # `invert` may print its own summary; the benchmark's output is its tables alone.
    with contextlib.redirect_stdout(io.StringIO()), counted_unet_rows(pipeline.unet) as rows:
        results = invert(pipeline, list(images), list(prompts), **options)
        synchronize(device)
    seconds = time.perf_counter() - start
    iterations = [sum(result.metadata["inner_iterations"]) for result in results]
    return Timing(
        configuration, mode, len(images), min(args.batch_size, len(images)), seconds, memory.peak(), memory.before,
        iterations, memory.kind, results, unet_rows=rows[0],
    )


def _accelerator(device: torch.device) -> str:
    """Lightning's accelerator name for `device` (`invert` runs on one device of that kind)."""
    return {"cuda": "gpu"}.get(device.type, device.type)
