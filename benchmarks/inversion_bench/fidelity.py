"""How far each configuration's inversions are from the fp32 ones of the same images, and its table."""

from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from inversion_bench.configurations import FIDELITY_REFERENCE
from inversion_bench.measure import Timing
from nti_lightning.api import reconstruction_latents
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.models.text import PromptEncoder


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


def fidelity_report(
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
