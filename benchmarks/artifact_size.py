"""Artifact size against reconstruction quality: what storing the null embeddings in half
precision costs, and the bytes per image of every kind of file.

    python benchmarks/artifact_size.py --images 16

1. Inverts `--images` held-out images of the `shapes` model (T = 50, N = 10, w = 7.5) and
   reconstructs each from its fp32 file and from its `null_dtype="float16"` file; prints the
   PSNR against the input of both and their difference (the option is kept only while the
   largest loss stays under 0.05 dB).
2. Writes files of Stable Diffusion 1.x (`[50, 77, 768]`), 2.x (`[50, 77, 1024]`) and SDXL
   (`[50, 77, 2048]` and `[50, 1280]`, 128x128 latents) shapes, per-step (null-text) and shared
   (the negative-prompt and DDIM baselines), fp32 and fp16, and prints their sizes.

Results go to docs/ARTIFACTS.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import nti_lightning as nti
from nti_lightning.data.images import to_tensor
from nti_lightning.demo.shapes import heldout_samples
from nti_lightning.inversion.report import image_metrics

#: (name, latent [C, h, w], token embeddings [77, D], pooled width or None) at 50 steps.
MODEL_SHAPES = (
    ("SD 1.x (512 px)", (4, 64, 64), (77, 768), None),
    ("SD 2.x (768 px)", (4, 96, 96), (77, 1024), None),
    ("SDXL (1024 px)", (4, 128, 128), (77, 2048), 1280),
)


def psnr(image, target: torch.Tensor) -> float:
    return float(image_metrics((to_tensor(image)[None] + 1) / 2, target)[0][0])


def reconstruction_loss(count: int, folder: Path) -> list[dict[str, float]]:
    """Per held-out image: PSNR (dB) of the reconstruction from the fp32 and the fp16 file."""
    pipe = nti.load_pipeline("shapes")
    samples = heldout_samples(count)
    inversions = nti.invert(pipe, [s.image for s in samples], [s.caption for s in samples], num_inference_steps=50,
                            num_inner_steps=10, batch_size=8, progress_bar=False)
    rows = []
    for k, (sample, inversion) in enumerate(zip(samples, inversions)):
        target = (to_tensor(sample.image)[None] + 1) / 2
        full = nti.Inversion.load(inversion.save(folder / f"{k}_fp32.safetensors"))
        half = nti.Inversion.load(inversion.save(folder / f"{k}_fp16.safetensors", null_dtype="float16"))
        rows.append({
            "fp32_psnr": psnr(nti.reconstruct(pipe, full), target),
            "fp16_psnr": psnr(nti.reconstruct(pipe, half), target),
            "fp32_bytes": (folder / f"{k}_fp32.safetensors").stat().st_size,
            "fp16_bytes": (folder / f"{k}_fp16.safetensors").stat().st_size,
        })
    return rows


def file_sizes(folder: Path) -> list[dict[str, object]]:
    """Bytes of a 50-step file of each model's shapes, for each way of storing the null tensors."""
    rows = []
    for name, latent, tokens, pooled in MODEL_SHAPES:
        for method, per_step in (("null_text", True), ("negative_prompt / ddim", False)):
            embeddings = torch.randn(50, *tokens) if per_step else torch.randn(1, *tokens).expand(50, -1, -1)
            pooled_embeddings = None
            if pooled is not None:
                pooled_embeddings = torch.randn(50, pooled) if per_step else torch.randn(1, pooled).expand(50, -1)
            metadata = {"num_inference_steps": 50, "guidance_scale": 7.5}
            if pooled is not None:
                metadata["time_ids"] = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]
            inversion = nti.Inversion(torch.randn(*latent), embeddings, torch.randn(*latent), "a photo", metadata,
                                      pooled_embeddings)
            sizes = {dtype: inversion.save(folder / f"size_{dtype}.safetensors", dtype).stat().st_size
                     for dtype in ("float32", "float16")}
            rows.append({"model": name, "method": method, **sizes})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="held-out shapes images to invert (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        losses = reconstruction_loss(args.images, folder) if args.images else []
        sizes = file_sizes(folder)
    if losses:
        print(f"\nshapes, {len(losses)} held-out images, T=50: reconstruction PSNR from the fp32 and the fp16 file")
        print("| image | fp32 dB | fp16 dB | loss dB |\n|---|---:|---:|---:|")
        for k, row in enumerate(losses):
            print(
                f"| {k} | {row['fp32_psnr']:.4f} | {row['fp16_psnr']:.4f} | "
                f"{row['fp32_psnr'] - row['fp16_psnr']:+.4f} |"
            )
        worst = max(row["fp32_psnr"] - row["fp16_psnr"] for row in losses)
        mean = sum(row["fp32_psnr"] - row["fp16_psnr"] for row in losses) / len(losses)
        print(
            f"mean loss {mean:+.4f} dB, largest {worst:+.4f} dB; file {losses[0]['fp32_bytes']} -> "
            f"{losses[0]['fp16_bytes']} bytes"
        )
    print("\n| model | method | float32 bytes | float16 bytes |\n|---|---|---:|---:|")
    for row in sizes:
        print(f"| {row['model']} | {row['method']} | {row['float32']:,} | {row['float16']:,} |")
    record = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "reconstruction": losses, "sizes": sizes}
    print("\n" + json.dumps(record))
    return record


if __name__ == "__main__":
    main()
