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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import io
import json
import logging
import math
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The baseline is the test suite's reference loop, which lives in the repository, not the package
# (tests/, imported as the tests import it).
for folder in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import nti_lightning  # noqa: E402
from nti_lightning.api import invert, reconstruction_latents  # noqa: E402
from nti_lightning.data.images import prepare  # noqa: E402
from nti_lightning.demo.shapes import heldout_samples  # noqa: E402
from nti_lightning.diffusion.ddim import ddim_scheduler  # noqa: E402
from nti_lightning.inversion.artifact import Inversion  # noqa: E402
from nti_lightning.models import vae as vae_codec  # noqa: E402
from nti_lightning.models.loading import load_pipeline  # noqa: E402
from nti_lightning.models.pipelines import is_sdxl  # noqa: E402
from nti_lightning.models.sd15 import sd15_random_pipeline  # noqa: E402
from nti_lightning.models.sdxl import sdxl_random_pipeline  # noqa: E402
from nti_lightning.models.text import PromptEncoder  # noqa: E402
from reference import ReferenceNullInversion  # noqa: E402
from reference_xl import ReferenceNullInversionXL  # noqa: E402

#: The package configurations timed, by name: keyword arguments passed to `nti_lightning.invert`.
#: Add a line to time a new option. A configuration with an option `invert` does not take is
#: skipped with a note, so this list may name options before the package has them.
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp32+reuse": {"reuse_cond_output": True},
    "fp32+reuse+sync-free": {"reuse_cond_output": True, "early_exit": False},
    "fp32+reuse+channels-last": {"reuse_cond_output": True, "channels_last": True},
    "bf16": {"precision": "bf16-mixed"},
    "bf16+reuse": {"precision": "bf16-mixed", "reuse_cond_output": True},
    "fp16+reuse": {"precision": "16-mixed", "reuse_cond_output": True},
    "bf16+reuse+compile": {"precision": "bf16-mixed", "reuse_cond_output": True, "compile": True},
    "bf16+checkpointing": {"precision": "bf16-mixed", "gradient_checkpointing": True},
    # The default scheduling is continuous batching; lockstep (a batch's images walk their
    # timesteps together) is kept for comparison.
    "fp32+lockstep": {"scheduling": "lockstep"},
    "bf16+lockstep": {"precision": "bf16-mixed", "scheduling": "lockstep"},
    "bf16+reuse+cuda-graphs": {
        "precision": "bf16-mixed",
        "reuse_cond_output": True,
        "early_exit": False,
        "compile": True,
        "compile_mode": "reduce-overhead",
    },
}

#: The configuration every other one is compared with in the fidelity check.
FIDELITY_REFERENCE = "fp32"

#: Inner-loop modes, by name: the early-stop ε. A negative ε is never reached, so every image
#: runs all N inner iterations at every step: the cost of the algorithm with no luck.
MODES: dict[str, float] = {"full": -1.0, "early-stop": 1e-5}

#: Precisions Lightning runs only on a GPU.
CUDA_ONLY_PRECISIONS = {"16-mixed"}

DEFAULT_PROMPT = "a photograph of a cat sitting next to a mirror"


# --------------------------------------------------------------------------------------------- inputs
def random_image(seed: int, size: int) -> Image.Image:
    """A smooth seeded random colour image, `size` x `size` (a 4x4 noise patch, upsampled).

    Args:
        seed (`int`): seeds the colours.
        size (`int`): side in pixels; the model's resolution, so no resizing happens later.
    """
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def build_pipeline(model: str, device: torch.device, resolution: Optional[int] = None) -> StableDiffusionPipeline:
    """The fp32 pipeline to time, on `device`, with the DDIM scheduler the algorithm uses.

    Args:
        model (`str`): "tiny", "sd15-random", "sdxl-random", or anything `nti_lightning.load_pipeline` takes.
        device (`torch.device`): where the weights go.
        resolution (`int`, *optional*): image side for "sdxl-random" (default its 1024 px).
    """
    if model in ("sd15-random", "sdxl-random"):
        # Initialised where it runs: no 4 (SDXL: 14) GB of random weights made on the host and copied over.
        if model == "sd15-random":
            pipeline = sd15_random_pipeline(seed=0, device=device)
        else:
            pipeline = sdxl_random_pipeline(seed=0, device=device, resolution=resolution)
        pipeline.scheduler = ddim_scheduler(pipeline.scheduler.config)
        return pipeline
    return load_pipeline(model).to(device)


class BaselineLoop(ReferenceNullInversion):
    """The reference loop, unchanged except that the prompt's token ids go to the text encoder's device.

    The reference was written for the CPU, where both are the same; on a GPU the ids would stay
    on the CPU. Encoding the prompt happens once per image, outside the inner loop being timed.
    """

    @torch.no_grad()
    def context(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder

        def encode(text: str) -> torch.Tensor:
            ids = tokenizer(
                [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            return encoder(ids.to(encoder.device))[0]

        return encode(""), encode(prompt)


class BaselineLoopXL(ReferenceNullInversionXL):
    """The SDXL reference loop, unchanged except that prompts are encoded on the text encoders'
    device and the time ids live on the UNet's (the reference was written for the CPU)."""

    def __init__(self, pipe: Any, num_ddim_steps: int = 50, guidance_scale: float = 7.5) -> None:
        super().__init__(pipe, num_ddim_steps=num_ddim_steps, guidance_scale=guidance_scale)
        self.time_ids = self.time_ids.to(pipe.unet.device)

    @torch.no_grad()
    def context(self, prompt: str) -> tuple[torch.Tensor, ...]:
        cond, uncond, cond_pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt, device=self.pipe.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return uncond.float(), cond.float(), uncond_pooled.float(), cond_pooled.float()


def baseline_loop(pipeline: Any, **options: Any) -> ReferenceNullInversion:
    """The reference loop that fits `pipeline`: SD's or SDXL's."""
    return (BaselineLoopXL if is_sdxl(pipeline) else BaselineLoop)(pipeline, **options)


# -------------------------------------------------------------------------------------- measuring
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


# -------------------------------------------------------------------------------------- fidelity
def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def fidelity(
    pipeline: StableDiffusionPipeline,
    candidate: Sequence[Inversion],
    reference: Sequence[Inversion],
    reference_reconstructions: Sequence[torch.Tensor],
    empty: torch.Tensor,
) -> dict[str, float]:
    """How far a configuration's inversions are from the fp32 ones of the same images.

    The per-step null embeddings are compared directly (relative L2 error, per step) and by the
    direction they moved away from the empty-prompt embedding ∅ (cosine, per step): Adam's
    sign-like steps make the direction the telling part. `z_T` is the pivot's end, reached
    without any optimisation, so it only shows the UNet's own rounding; the reconstruction
    latent (sampling from `z_T` with the embeddings, in the pipeline's fp32) shows what an edit
    would start from.

    Args:
        pipeline (`StableDiffusionPipeline`): the pipeline both were made with.
        candidate (sequence of `Inversion`): the configuration's results.
        reference (sequence of `Inversion`): the fp32 results, same images in the same order.
        reference_reconstructions (sequence of `torch.Tensor`): `reconstruction_latents` of `reference`.
        empty (`torch.Tensor`): `[1, 77, D]` ∅ on the CPU.
    """
    errors, cosines, reconstruction_errors, z_errors = [], [], [], []
    for mine, theirs, theirs_reconstructed in zip(candidate, reference, reference_reconstructions):
        a, b = mine.null_embeddings.float().cpu(), theirs.null_embeddings.float().cpu()
        errors.append((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))
        cosines.append(F.cosine_similarity((a - empty).flatten(1), (b - empty).flatten(1), dim=1))
        reconstruction_errors.append(
            _relative(reconstruction_latents(pipeline, mine).cpu(), theirs_reconstructed)
        )
        z_errors.append(_relative(mine.z_T.cpu(), theirs.z_T.cpu()))
    errors_all, cosines_all = torch.cat(errors), torch.cat(cosines)
    return {
        "embedding_relative_error_max": float(errors_all.max()),
        "embedding_relative_error_mean": float(errors_all.mean()),
        "displacement_cosine_min": float(cosines_all.min()),
        "displacement_cosine_mean": float(cosines_all.mean()),
        "reconstruction_relative_error_max": max(reconstruction_errors),
        "z_T_relative_error_max": max(z_errors),
    }


# ------------------------------------------------------------------------------------ reporting
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


def fidelity_table(results: dict[str, dict[str, float]]) -> str:
    """The fidelity numbers as a Markdown table, one row per configuration."""
    lines = [
        f"| configuration vs {FIDELITY_REFERENCE} | embedding rel. error max | mean | displacement cosine min | mean "
        "| reconstruction rel. error max | z_T rel. error max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in results.items():
        lines.append(
            f"| {name} | {f['embedding_relative_error_max']:.2e} | {f['embedding_relative_error_mean']:.2e} | "
            f"{f['displacement_cosine_min']:.4f} | {f['displacement_cosine_mean']:.4f} | "
            f"{f['reconstruction_relative_error_max']:.2e} | {f['z_T_relative_error_max']:.2e} |"
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


# ---------------------------------------------------------------------------------------- main
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

    fidelities = _fidelity_report(pipeline, timings, args) if not args.no_fidelity else {}
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


def _fidelity_report(
    pipeline: StableDiffusionPipeline, timings: Sequence[Timing], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Compares every configuration's full-mode results with the fp32 ones and prints the table.

    The full mode is used because there every image runs the same iterations in both, so the
    differences are rounding alone, not a different early stop.
    """
    full = {t.configuration: t for t in timings if t.mode == "full" and t.configuration != "baseline"}
    others = [name for name in full if name != FIDELITY_REFERENCE]
    if "full" not in args.modes:
        print("\nnote: no fidelity check: it compares the full-mode runs")
        return {}
    if not others:
        return {}
    if FIDELITY_REFERENCE not in full:
        print(f"\nnote: no fidelity check: it needs the {FIDELITY_REFERENCE} configuration in full mode")
        return {}
    reference = full[FIDELITY_REFERENCE].results
    empty = PromptEncoder.of(pipeline).null().embeddings.cpu()
    reconstructions = [reconstruction_latents(pipeline, inversion).cpu() for inversion in reference]
    results = {name: fidelity(pipeline, full[name].results, reference, reconstructions, empty) for name in others}
    print()
    print(fidelity_table(results))
    bad = [name for name, f in results.items() if not all(math.isfinite(v) for v in f.values())]
    if bad:
        print(f"warning: non-finite values in {', '.join(bad)}")
    return results


if __name__ == "__main__":
    main()
