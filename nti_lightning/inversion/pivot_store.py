"""DDIM pivots kept on disk, so that several methods inverting the same images compute each once.

Every method this package compares (`null_text`, `negative_prompt`, `ddim`, `direct`) starts
from the same pivot: the DDIM inversion of the image's VAE latent with its source prompt at
w = 1 (step 1 of docs/ALGORITHM.md). `PivotStore` keeps each image's `[T + 1, C, h, w]`
trajectory in `<folder>/<id>.safetensors`, with what it depends on in the header: the model's
weights (fingerprint), the precision it ran under, the schedule (timesteps and alphas) and the
prompt. A stored pivot is used only when all of these match and its `z0` is the run's own VAE
latent of the image (up to the float rounding of another batch composition); anything else is
computed afresh and overwrites it. `load_or_compute` is what the walks call.

With a store, a run that reads every pivot gives what the run that computed them gave, bit for
bit; against a run without a store, results differ by float rounding (the pivots are kept in
one memory layout, where a computed one may come out channels-last).

A pivot at SD 1.x's 512 px is 51 x 4 x 64 x 64 fp32 values, 3.3 MB per image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.inversion.pivot import PivotTrajectory
from nti_lightning.storage.atomic import atomic_path, ensure_folder

#: How far a stored `z0` may be from the run's own and still be the same image's latent: the VAE
#: encoder's rounding in another batch is ~1e-6 relative; another image is ~1 away.
Z0_TOLERANCE = 1e-4


class PivotStore:
    """A folder of DDIM pivots for one model, precision and schedule.

    Args:
        folder (`str` or `Path`): where the pivots are (created when the first is written).
        context (`str`): what else the pivots depend on, e.g. the weights' fingerprint and the
            precision; a stored pivot with another context is not used.
        schedule (`DDIMSchedule`): the schedule the pivots walk.
    """

    def __init__(self, folder: str | Path, context: str, schedule: DDIMSchedule) -> None:
        self.folder = Path(folder)
        alphas = hashlib.sha256(schedule.alphas_cumprod.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]
        self.key = {"context": context, "timesteps": json.dumps(schedule.timesteps.tolist()), "alphas": alphas}

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.safetensors"

    def load(self, image_id: str, prompt: str, z0: torch.Tensor) -> Optional[torch.Tensor]:
        """`[T + 1, C, h, w]` stored pivot of one image whose VAE latent is `z0` (`[C, h, w]`), or
        `None` when there is none that fits (none stored, another prompt, model or schedule, or
        another image under the same id)."""
        path = self.path(image_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                latents = handle.get_tensor("latents")
        except (SafetensorError, OSError, KeyError, ValueError):
            return None  # damaged or foreign: computed again and overwritten
        if any(metadata.get(name) != value for name, value in {**self.key, "prompt": prompt}.items()):
            return None
        stored = latents[0].to(z0.device)
        if stored.shape != z0.shape or not torch.allclose(stored, z0.float(), rtol=Z0_TOLERANCE, atol=Z0_TOLERANCE):
            return None
        return latents

    def save(self, image_id: str, prompt: str, latents: torch.Tensor) -> None:
        """Writes one image's `[T + 1, C, h, w]` pivot (atomically: a reader never sees half a file)."""
        ensure_folder(self.folder)
        with atomic_path(self.path(image_id)) as temporary:
            save_file({"latents": latents.detach().float().cpu().contiguous()}, str(temporary),
                      metadata={**self.key, "prompt": prompt})


def load_or_compute(
    store: Optional[PivotStore],
    compute: Callable[[torch.Tensor, Condition], PivotTrajectory],
    schedule: DDIMSchedule,
    z0: torch.Tensor,
    cond: Condition,
    ids: Sequence[str],
    prompts: Sequence[str],
    valid: Optional[Sequence[bool]] = None,
) -> PivotTrajectory:
    """The pivots of a batch of images: those in `store` read, the others computed together by
    `compute(z0, cond)` (e.g. `ddim_invert`) and written to it: the `[T + 1, B, ...]` trajectory.

    Args:
        store (`PivotStore`, *optional*): where pivots are kept; `None` computes them all.
        compute (callable): the batched DDIM inversion of some rows `(z0, cond)`.
        schedule (`DDIMSchedule`): the schedule (its timesteps label the trajectory).
        z0 (`torch.Tensor`): `[B, C, h, w]` VAE latents.
        cond (`Condition`): their B source conditions.
        ids, prompts (`Sequence[str]`): the images' ids and prompts.
        valid (`Sequence[bool]`, *optional*): rows that are images; with a store, padding rows are
            neither computed nor stored (their latents are z0's).
    """
    if store is None:
        return compute(z0, cond)
    valid = [True] * len(ids) if valid is None else [bool(v) for v in valid]
    stored = [store.load(ids[k], prompts[k], z0[k]) if valid[k] else None for k in range(len(ids))]
    missing = [k for k, latents in enumerate(stored) if latents is None and valid[k]]
    # One layout whether read or computed: the UNet's output (hence a computed pivot) may be
    # channels-last, and a walk starting from another layout rounds differently. With a store,
    # a run that reads every pivot gives the run that computed them bit for bit.
    # Padding rows are never read: they keep z0 rather than cost an inversion.
    latents = z0.float()[None].repeat(len(schedule.timesteps) + 1, 1, 1, 1, 1)
    if missing:
        latents[:, missing] = compute(z0[missing], cond.rows(missing)).latents.float()
    for k, rows in enumerate(stored):
        if rows is not None:
            latents[:, k] = rows.to(z0.device)
    for k in missing:
        store.save(ids[k], prompts[k], latents[:, k])
    return PivotTrajectory(latents=latents, timesteps=schedule.timesteps.clone())
