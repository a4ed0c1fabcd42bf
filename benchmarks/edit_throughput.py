"""Edit throughput: `nti predict`'s edits with many specs sampled together against one at a time.

    python benchmarks/edit_throughput.py --images 16 --batch-sizes 1 8 16
    python benchmarks/edit_throughput.py --specs bench --images 12 --batch-sizes 1 12   # the offline PIE-Bench's edits

Inverts `--images` held-out images of the `shapes` model (DDIM inversion: the edits' cost does
not depend on the method), then edits each through `nti predict` at each batch size: with
`--specs colour` (the default) a colour swap under Prompt-to-Prompt (Replace with LocalBlend on
the shape word, cross 0.8 / self 0.7, as the shapes quality test); with `--specs bench` the
offline PIE-Bench's samples with the edits `nti bench --config configs/bench_demo.yaml` makes
(Refine, the blend word reweighted, LocalBlend; no reconstruction panel, as `nti bench` runs
them), and prints edits per second and the speed-up over one at a time. Timed is
`EditModule.predict_step` over all the specs (loading, checking, sampling, decoding: what a predict
run spends per batch). Each batch size runs `--repeats` times (fastest kept) after one untimed
warm-up batch. Beside the wall time it reports this process's CPU time (all its threads) and the
seconds the hypervisor stole from the machine during each run (/proc/stat): on a shared virtual
machine the wall time counts stolen time and the CPU time does not, so the CPU-time speed-up is the
one a machine of one's own would see. It also counts the process's minor page faults: buffers the
heap handed back and had to fault in again. The script sets the heap as `nti` does
(`nti_lightning.host_memory`); `NTI_KEEP_FREED_MEMORY=0` measures glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
import yaml

import nti_lightning as nti
from nti_lightning.bench.shapes_set import write_shapes_bench
from nti_lightning.data.pie_bench import read_mapping
from nti_lightning.demo.shapes import SHAPE_COLORS, heldout_samples
from nti_lightning.editing.data import edit_items
from nti_lightning.editing.module import EditModule
from nti_lightning.editing.pie_bench import benchmark_edit
from nti_lightning.host_memory import keep_freed_memory_unless_disabled


def write_specs(folder: Path, count: int, steps: int) -> Path:
    """Inversions of `count` held-out images and one colour-swap spec each; the specs' JSONL file."""
    pipe = nti.load_pipeline("shapes")
    samples = heldout_samples(count)
    inversions = nti.invert(pipe, [s.image for s in samples], [s.caption for s in samples], num_inference_steps=steps,
                            method="ddim", batch_size=8, progress_bar=False)
    lines = []
    for k, (sample, inversion) in enumerate(zip(samples, inversions)):
        artifact = inversion.save(folder / f"img{k}.safetensors")
        new = next(color for color in SHAPE_COLORS if color != sample.color)
        target = sample.caption.replace(f"a {sample.color} ", f"a {new} ", 1)
        lines.append(json.dumps({"artifact": str(artifact), "prompts": [target], "id": f"img{k}",
                                 "options": {"cross_replace_steps": 0.8, "self_replace_steps": 0.7,
                                             "blend_words": [[sample.shape], [sample.shape]]}}))
    specs = folder / "edits.jsonl"
    specs.write_text("\n".join(lines) + "\n")
    return specs


def write_bench_specs(folder: Path, count: int, steps: int) -> Path:
    """The offline PIE-Bench's first `count` samples, inverted, with the edit specs `nti bench`
    makes of them under configs/bench_demo.yaml's settings; the specs' JSONL file."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "bench_demo.yaml").read_text())
    samples, _ = read_mapping(write_shapes_bench(folder / "pie", count))
    pipe = nti.load_pipeline("shapes")
    inversions = nti.invert(
        pipe,
        [s.image for s in samples],
        [s.original_prompt for s in samples],
        num_inference_steps=steps,
        method="ddim",
        batch_size=8,
        progress_bar=False,
    )
    lines = [json.dumps(benchmark_edit(sample, inversion.save(folder / f"{sample.id}.safetensors"), config["edit"]))
             for sample, inversion in zip(samples, inversions)]
    specs = folder / "edits.jsonl"
    specs.write_text("\n".join(lines) + "\n")
    return specs


def stolen_seconds() -> float:
    """The machine's CPU time taken by its hypervisor so far (/proc/stat's steal), 0 where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run(module: EditModule, items: list[dict], batch_size: int) -> tuple[float, float, float, int]:
    """Wall seconds, this process's CPU seconds, the machine's stolen seconds and this process's
    minor page faults of `EditModule.predict_step` over every spec, `batch_size` at a time (what a
    predict run spends per batch, without Lightning's start-up or the model's load)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started, cpu, stolen = time.perf_counter(), time.process_time(), stolen_seconds()
    for start in range(0, len(items), batch_size):
        results = module.predict_step(items[start : start + batch_size], start // batch_size)
        failed = [result["error"] for result in results if "error" in result]
        if failed:
            raise RuntimeError(f"edits failed: {failed}")
    return (time.perf_counter() - started, time.process_time() - cpu, stolen_seconds() - stolen,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="edits (one per held-out image; default 16)")
    parser.add_argument("--steps", type=int, default=50, help="T (default 50)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 16], help="specs per step (default 1 8 16)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per batch size, taken in turns, the fastest kept (default 2)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--channels-last", action="store_true", help="the UNet's weights in channels-last format (model.channels_last)"
    )
    parser.add_argument("--specs", choices=["colour", "bench"], default="colour",
                        help="colour swaps (default) or the offline PIE-Bench's edits as nti bench makes them")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # As `nti` does at start-up (NTI_KEEP_FREED_MEMORY=0 measures glibc's defaults).
    kept = keep_freed_memory_unless_disabled()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        bench = args.specs == "bench"
        specs = (write_bench_specs if bench else write_specs)(folder, args.images, args.steps)
        module = EditModule(
            pretrained="shapes", attention_maps=False, reconstruction=not bench, channels_last=args.channels_last
        )
        module.configure_model()
        items = edit_items([], str(specs))
        run(module, items[: max(args.batch_sizes)], max(args.batch_sizes))  # warm-up
        # Repeats go round the batch sizes, so a slow spell of a shared machine hits them alike.
        runs: dict[int, list[tuple[float, float, float, int]]] = {batch_size: [] for batch_size in args.batch_sizes}
        for _ in range(args.repeats):
            for batch_size in args.batch_sizes:
                runs[batch_size].append(run(module, items, batch_size))
        for batch_size, measured in runs.items():
            wall, cpu, stolen, faults = (list(column) for column in zip(*measured))
            rows.append({"batch_size": batch_size, "seconds": min(wall), "seconds_of_repeats": wall,
                         "cpu_seconds": min(cpu), "cpu_seconds_of_repeats": cpu, "stolen_seconds_of_repeats": stolen,
                         "page_faults_of_repeats": faults,
                         "edits_per_second": args.images / min(wall)})
    one = next((row["seconds"] for row in rows if row["batch_size"] == 1), None)
    kind = "the offline PIE-Bench's edits" if args.specs == "bench" else "Replace + LocalBlend"
    layout = (", channels-last UNet" if args.channels_last else "") + (
        "" if kept else ", glibc's default heap trimming"
    )
    print(f"\nshapes, {args.images} edits ({kind}), T={args.steps}, {torch.get_num_threads()} threads{layout}")
    one_cpu = next((row["cpu_seconds"] for row in rows if row["batch_size"] == 1), None)
    print(
        "| specs per step | seconds | edits/s | speed-up | CPU seconds | speed-up in CPU time | stolen seconds | "
        "page faults |\n"
        "|---:|---:|---:|---:|---:|---:|---|---|"
    )
    for row in rows:
        row["speedup"] = one / row["seconds"] if one else None
        row["cpu_speedup"] = one_cpu / row["cpu_seconds"] if one_cpu else None
        speedup = f"{row['speedup']:.2f}x" if one else "-"
        cpu_speedup = f"{row['cpu_speedup']:.2f}x" if one_cpu else "-"
        stolen = ", ".join(f"{value:.1f}" for value in row["stolen_seconds_of_repeats"])
        print(
            f"| {row['batch_size']} | {row['seconds']:.2f} | {row['edits_per_second']:.2f} | {speedup} "
            f"| {row['cpu_seconds']:.2f} | {cpu_speedup} | {stolen} | "
            f"{', '.join(map(str, row['page_faults_of_repeats']))} |"
        )
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        "keep_freed_memory": kept,
        "images": args.images,
        "steps": args.steps,
        "specs": args.specs,
        "rows": rows,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
