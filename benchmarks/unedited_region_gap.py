"""Where an edit's unedited-region score parts from the VAE round trip's, on a bench run's own edits.

    python benchmarks/unedited_region_gap.py --config configs/bench_demo.yaml

Runs (or, on a finished run, merely reads) `nti bench` with the config, then samples each
method's edits again from its inversions with the benchmark's settings, as the bench does, this
time keeping the final latents. Each sample is scored on the unedited region (PSNR as the
evaluator computes it, `bench.metrics.psnr_unedited`) in these ways:

- `edit`: the edit, the number in the bench's table;
- `reconstruction`: the source row of the same sampling, the inversion under the edit's controller;
- `vae`: the source's own VAE latent decoded, the table's `vae_round_trip` row;
- `vae + edit cells`: the VAE latent in every latent cell that holds no edited pixel, the edit's
  latent in the cells that do: what the same edit would score with a perfect inversion and no
  change at all outside its region's cells;
- `far: edit` / `far: vae`: the edit and the VAE round trip on the pixels whose latent cell holds
  no edited pixel (the cells along the region's outline left out);
- `edit region: edit`: the same PSNR on the edit region instead (how much the edit changed
  where it was asked to: the lower, the larger the change).

If `vae + edit cells` scores like `edit`, the gap to `vae` is made by the decoder carrying the
edited cells' change into the pixels around them, not by the inversion or LocalBlend's mask.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import nti_lightning as nti
from nti_lightning.bench.metrics import psnr_unedited
from nti_lightning.bench.run import BenchConfig, run_bench
from nti_lightning.bench.score import MAPPING_FILE
from nti_lightning.data.images import to_pil
from nti_lightning.data.pie_bench import read_mapping
from nti_lightning.data.pie_masks import decode_mask
from nti_lightning.editing.edit import EditJob, edit_jobs_latents
from nti_lightning.editing.pie_bench import benchmark_edit
from nti_lightning.editing.specs import EditSpec
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.models import vae as vae_codec

COLUMNS = ("edit", "reconstruction", "vae", "vae + edit cells", "far: edit", "far: vae", "edit region: edit")


def decoded(pipeline: nti.Pipeline, latent: torch.Tensor) -> np.ndarray:
    """The `uint8` picture of one `[C, h, w]` latent."""
    return np.asarray(to_pil(vae_codec.decode(pipeline.vae, latent[None])[0]))


def method_scores(pipeline: nti.Pipeline, config: BenchConfig, samples: list, method: str) -> dict[str, list[float]]:
    """The scores (`COLUMNS`) of every sample `method` inverted (see the module's documentation)."""
    inversions = Path(config.output_dir) / method / "inversions"
    chosen = [s for s in samples if (inversions / f"{s.id}.safetensors").is_file()]
    jobs = []
    for sample in chosen:
        spec = EditSpec.from_dict(
            benchmark_edit(sample, inversions / f"{sample.id}.safetensors", config.edit), sample.id
        )
        inversion = Inversion.load(spec.artifact)
        prompts = spec.all_prompts(inversion.prompt)
        controller = spec.controller(prompts, pipeline.tokenizer)
        jobs.append(EditJob(inversion, prompts, controller, controller.new_store()))
    scores: dict[str, list[float]] = {column: [] for column in COLUMNS}
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start : start + config.batch_size]
        latents = edit_jobs_latents(pipeline, batch, float(config.model.get("guidance_scale", 7.5)))
        for sample, job, latent in zip(chosen[start:], batch, latents):
            source = np.asarray(Image.open(sample.image).convert("RGB"))
            mask = decode_mask(sample.mask, source.shape[:2])
            if mask.min() >= 1:
                continue  # no unedited region: the evaluator's nan, left out of its means
            vae_latent = job.inversion.source_latent.to(latent)
            factor = source.shape[0] // latent.shape[-2]
            cells = F.max_pool2d(torch.from_numpy(mask).float()[None, None], factor, factor)[0]  # [1, h, w]
            composite = vae_latent * (1 - cells) + latent[1] * cells
            edit, vae = decoded(pipeline, latent[1]), decoded(pipeline, vae_latent)
            far = F.interpolate(cells[None], scale_factor=factor, mode="nearest")[0, 0].numpy().astype(mask.dtype)
            values = [psnr_unedited(source, edit, mask), psnr_unedited(source, decoded(pipeline, latent[0]), mask),
                      psnr_unedited(source, vae, mask), psnr_unedited(source, decoded(pipeline, composite), mask)]
            values += (
                [psnr_unedited(source, edit, far), psnr_unedited(source, vae, far)] if far.min() < 1 else [math.nan] * 2
            )
            values.append(psnr_unedited(source, edit, 1 - mask))  # the region the edit was asked to change
            for column, value in zip(COLUMNS, values):
                scores[column].append(value)
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/bench_demo.yaml", help="an nti bench config (default configs/bench_demo.yaml)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig.load(args.config)
    run_bench(config)  # resumable: a finished run is only scored again
    samples, _ = read_mapping(Path(config.root) / MAPPING_FILE)
    pipeline = nti.load_pipeline(config.model.get("pretrained", "shapes"))
    if config.model.get("channels_last"):  # as the bench's edits ran
        pipeline.unet.to(memory_format=torch.channels_last)
    table = {}
    for method in config.methods:
        scores = method_scores(pipeline, config, samples, method)
        table[method] = {column: float(np.nanmean(values)) if values else math.nan for column, values in scores.items()}
        table[method]["samples"] = len(scores["edit"])
        table[method]["far samples"] = int(np.isfinite(scores["far: edit"]).sum())
    print(f"\nPSNR of the unedited region, {args.config}, mean over the samples with some unedited region")
    print("| method | " + " | ".join(COLUMNS) + " | samples (far) |\n|---|" + "---:|" * (len(COLUMNS) + 1))
    for method, row in table.items():
        cells = " | ".join(f"{row[column]:.2f}" for column in COLUMNS)
        print(f"| {method} | {cells} | {row['samples']} ({row['far samples']}) |")
    record = {"date": time.strftime("%Y-%m-%d"), "config": args.config, "torch": torch.__version__, "table": table}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
