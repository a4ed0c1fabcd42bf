"""PIE-Bench throughput: images per hour of `nti bench` (invert + edit + score), per method.

    python benchmarks/pie_throughput.py --model sd15-random --samples 32 --device cuda   # on a GPU
    python benchmarks/pie_throughput.py --tiny                                          # rehearsal on a CPU

Writes a PIE-Bench-format set of `--samples` generated samples at `--resolution` px (the shapes
generator's held-out pictures drawn at that size: colour, object and background edits with exact
masks, `nti_lightning.bench.shapes_set`), then runs `nti bench` on it exactly as on PIE-Bench:
every method inverted (the pivot shared), edited with the benchmark's settings, and scored. The
structure distance and CLIP run on random-weight DINO ViT-B/8 and CLIP ViT-L/14 built from their
configurations (`--score-networks`), so the scoring's compute is in the time though no weights
are downloaded; LPIPS needs torchvision and is left out.

Per method it prints the seconds of each stage (from `bench_timings.jsonl`), images per hour
(the method's inversion and edits plus its share of the scoring) and the time the 700-image
benchmark would take at that rate; a JSON line with all of it (device, date, commit, versions)
goes to `--output`. The target of an H100/H200: Null-text + P2P on 700 images in <= 30 min.

Random weights never meet Null-text's early stop, so every step takes all N inner iterations:
the time is an upper bound of what a converging model (real Stable Diffusion) costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from nti_lightning.inversion.methods import METHODS

PIE_BENCH_IMAGES = 700


def score_networks(folder: Path, tiny: bool) -> dict[str, str]:
    """Random-weight DINO ViT-B/8 and CLIP ViT-L/14 (small ones with `tiny`) saved under `folder`."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    if tiny:
        vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8,
                        image_size=224, layer_norm_eps=1e-6)
        clip = CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "intermediate_size": 64},
                          vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "intermediate_size": 64, "patch_size": 14, "image_size": 224},
                          projection_dim=32)
    else:  # DINO ViT-B/8 and CLIP ViT-L/14 as the benchmark uses them
        vit = ViTConfig(patch_size=8, image_size=224, layer_norm_eps=1e-6)
        clip = CLIPConfig(text_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                       "intermediate_size": 3072},
                          vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                         "intermediate_size": 4096, "patch_size": 14, "image_size": 224},
                          projection_dim=768)
    ViTModel(vit, add_pooling_layer=False).save_pretrained(folder / "dino")
    CLIPModel(clip).save_pretrained(folder / "clip")
    return {"dino": str(folder / "dino"), "clip": str(folder / "clip")}


def stage_seconds(timings: Path) -> dict[str, dict[str, float]]:
    """`{method: {stage: seconds}}` from a bench's `bench_timings.jsonl`."""
    seconds: dict[str, dict[str, float]] = {}
    for line in timings.read_text().splitlines():
        row = json.loads(line)
        stages = seconds.setdefault(row["method"], {})
        stages[row["stage"]] = stages.get(row["stage"], 0.0) + row["seconds"]
    return seconds


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(args: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random", help="any model nti fit takes (default sd15-random)")
    parser.add_argument("--samples", type=int, default=32, help="generated PIE-format samples (default 32)")
    parser.add_argument("--resolution", type=int, default=512, help="their side in px (default 512, PIE-Bench's)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="the methods (default: every one)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="images inverted and specs edited together (default 8)"
    )
    parser.add_argument("--steps", type=int, default=50, help="T (default 50)")
    parser.add_argument("--inner-steps", type=int, default=10, help="N (default 10)")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer.precision (default bf16-mixed)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    parser.add_argument(
        "--tiny", action="store_true", help="CPU rehearsal: the tiny model, 4 samples, T = 4, N = 2, small scorers"
    )
    parser.add_argument("--folder", help="where the set and the outputs go (default: a temporary folder)")
    parser.add_argument("--output", help="append the result as a JSON line to this file")
    options = parser.parse_args(args)
    if options.tiny:
        options.model, options.samples, options.resolution, options.steps, options.inner_steps = "tiny", 4, 32, 4, 2
        options.device, options.precision, options.batch_size = "cpu", "32-true", 2

    from nti_lightning.bench.run import TIMINGS, BenchConfig, run_bench

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(options.folder or temporary)
        networks = score_networks(folder / "networks", options.tiny)
        config = BenchConfig(
            root=str(folder / "pie"),
            demo_samples=options.samples,
            demo_resolution=options.resolution,
            methods=list(options.methods),
            output_dir=str(folder / "out"),
            batch_size=options.batch_size,
            model={
                "pretrained": options.model,
                "num_inference_steps": options.steps,
                "num_inner_steps": options.inner_steps,
            },
            trainer={
                "accelerator": "cpu" if options.device == "cpu" else "gpu",
                "devices": 1,
                "precision": options.precision,
                "enable_progress_bar": False,
            },
            score={**networks, "lpips": "none", "device": options.device},
        )
        started = time.monotonic()
        run_bench(config)
        total = time.monotonic() - started
        seconds = stage_seconds(Path(config.output_dir) / TIMINGS)
    score_share = seconds.get("all", {}).get("score", 0.0) / len(options.methods)
    rows = []
    for method in options.methods:
        stages = seconds.get(method, {})
        spent = stages.get("invert", 0.0) + stages.get("edit", 0.0) + score_share
        per_hour = options.samples / spent * 3600 if spent > 0 else float("nan")
        rows.append(
            {
                "method": method,
                "invert_s": round(stages.get("invert", 0.0), 2),
                "edit_s": round(stages.get("edit", 0.0), 2),
                "score_share_s": round(score_share, 2),
                "images_per_hour": round(per_hour, 1),
                "pie_bench_minutes": round(PIE_BENCH_IMAGES / per_hour * 60, 1),
            }
        )
    device = (
        torch.cuda.get_device_name(0)
        if options.device != "cpu" and torch.cuda.is_available()
        else platform.processor() or "cpu"
    )
    result = {
        "benchmark": "pie_throughput",
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "torch": torch.__version__,
        "model": options.model,
        "samples": options.samples,
        "resolution": options.resolution,
        "T": options.steps,
        "N": options.inner_steps,
        "precision": options.precision,
        "batch_size": options.batch_size,
        "total_s": round(total, 1),
        "rows": rows,
    }
    print(
        f"\nPIE-Bench-shaped run: {options.model}, {options.samples} samples at {options.resolution} px, T = "
        f"{options.steps}, "
        f"N = {options.inner_steps}, {options.precision}, batch {options.batch_size}, on {device}; {total:.0f} s in "
        "all\n"
    )
    print(
        "| method | invert s | edit s | score share s | images/hour | 700 images (min) "
        "|\n|---|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        print(
            f"| {row['method']} | {row['invert_s']} | {row['edit_s']} | {row['score_share_s']} | "
            f"{row['images_per_hour']} | "
            f"{row['pie_bench_minutes']} |"
        )
    if options.output:
        with open(options.output, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
        print(f"\nappended to {options.output}")
    return result


if __name__ == "__main__":
    main()
