"""The state of one batch of images walking its pivot trajectory from T to 1.

`NullTextTrajectory` is plain torch: it starts from pixels and prompts (VAE encoding, pivot),
hands out the `TimestepProblem` of each step, freezes each step's optimised embedding and
advances the latent with the guided DDIM step, and finally packs one `Inversion` per image.
The Lightning callback calls these at epoch boundaries; nothing here knows about Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods import DEFAULT_METHOD, InversionMethod
from nti_lightning.inversion.null_text import TimestepProblem
from nti_lightning.inversion.pivot import PivotTrajectory, ddim_invert
from nti_lightning.inversion.pivot_store import PivotStore, load_or_compute
from nti_lightning.inversion.step import advance, finished_inversion


@dataclass
class NullTextTrajectory:
    """Null-text inversion of B images, one timestep at a time.

    Args:
        ids (`list[str]`): image ids, one per slot ("" for an empty slot).
        prompts (`list[str]`): source prompts, one per slot.
        pixels (`torch.Tensor`): `[B, 3, H, W]` inputs in [-1, 1].
        cond (`Condition`): the source-prompt conditions C (for SDXL with pooled embeddings and time ids).
        pivot (`PivotTrajectory`): the w = 1 DDIM inversion of the images.
        latent (`torch.Tensor`): `[B, C, h, w]` current latent z̄ (starts at `z_T`).
        null_embeddings (`list[torch.Tensor]`): frozen `[B, 77, D]` embedding of each finished step.
        null_pooled_embeddings (`list[torch.Tensor]`): frozen `[B, P]` pooled embedding of each
            finished step (SDXL; empty for SD 1.x/2.x).
        iterations (`list[torch.Tensor]`): `[B]` inner iterations used at each finished step.
        losses (`list[torch.Tensor]`): `[B]` last loss of each finished step.
        valid (`torch.Tensor`, *optional*): `[B]` bool, slots that hold an image; an empty slot
            (the end of a short batch) is carried along but never optimised nor returned.
        offsets (`list[torch.Tensor]`): the `[B, C, h, w]` offset of each finished step, for a
            method that stores them (Direct Inversion; empty for the others; see `advance`).
        method (`InversionMethod`, defaults to Null-text): the inversion method.
        start_latent (`torch.Tensor`, *optional*): `[B, C, h, w]` the walk's latent at the step
            edits start at (`InversionMethod.start_step`), once the walk is there; stored as `z_T`.
    """

    ids: list[str]
    prompts: list[str]
    pixels: torch.Tensor
    cond: Condition
    pivot: PivotTrajectory
    latent: torch.Tensor
    null_embeddings: list[torch.Tensor] = field(default_factory=list)
    null_pooled_embeddings: list[torch.Tensor] = field(default_factory=list)
    iterations: list[torch.Tensor] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    valid: Optional[torch.Tensor] = None
    offsets: list[torch.Tensor] = field(default_factory=list)
    method: InversionMethod = DEFAULT_METHOD
    start_latent: Optional[torch.Tensor] = None

    @classmethod
    @torch.no_grad()
    def start(
        cls,
        unet: UNet2DConditionModel,
        schedule: DDIMSchedule,
        pixels: torch.Tensor,
        z0: torch.Tensor,
        cond: Condition,
        ids: list[str],
        prompts: list[str],
        valid: Optional[torch.Tensor] = None,
        pivot_store: Optional[PivotStore] = None,
        method: Optional[InversionMethod] = None,
        empty: Optional[Condition] = None,
    ) -> "NullTextTrajectory":
        """Computes the pivot of images `pixels` with VAE latents `z0` (step 1 of docs/ALGORITHM.md),
        or reads it from `pivot_store` (see `nti_lightning.inversion.pivot_store`), or the method's
        own (`InversionMethod.walk_pivot`, which may need ∅, `empty`); `method` defaults to Null-text."""
        if valid is None:
            valid = torch.ones(len(ids), dtype=torch.bool)
        method = method if method is not None else DEFAULT_METHOD
        pivot = method.walk_pivot(unet, schedule, z0, cond, empty, ids)
        if pivot is None:  # the DDIM inversion, shared by the methods
            pivot = load_or_compute(
                pivot_store, lambda rows, rows_cond: ddim_invert(unet, schedule, rows, rows_cond), schedule, z0, cond,
                ids, prompts, valid.tolist(),
            )
        valid = valid.to(z0.device)
        return cls(ids, prompts, pixels, cond, pivot, latent=pivot.z_T.clone(), valid=valid, method=method)

    @property
    def step(self) -> int:
        """Index of the next step to optimise."""
        return len(self.null_embeddings)

    @property
    def done(self) -> bool:
        return self.step == len(self.pivot)

    def problem(self, unet: UNet2DConditionModel, epsilon: float) -> TimestepProblem:
        """The null-text problem of the next step, starting from the current latent.

        For a method without optimisation (`InversionMethod.optimises` False) no image is active:
        the step is only frozen and advanced.
        """
        item = self.pivot[self.step]
        active = self.valid if self.method.optimises else torch.zeros_like(self.valid)
        return TimestepProblem.start(
            unet, item["step"], item["timestep"], self.latent, item["target"], self.cond, epsilon, active
        )

    @torch.no_grad()
    def advance(
        self,
        schedule: DDIMSchedule,
        unet: UNet2DConditionModel,
        problem: TimestepProblem,
        null: Condition,
        guidance_scale: float,
        reuse_cond_output: bool = False,
    ) -> None:
        """Freezes the null condition `null` as this step's result and takes the guided DDIM step
        with it (`nti_lightning.inversion.step.advance`: the method then decides where the walk
        goes on from, and what offset it stores).

        By default the step evaluates both branches in one UNet call, as the reference does, so
        a single image reproduces it bit for bit; `reuse_cond_output` reuses the step's
        conditional output instead (one UNet forward less per step, same maths, different
        float rounding).
        """
        target = self.pivot[self.step]["target"]
        frozen = null.clone().to(dtype=torch.float32)
        cond_output = problem.cond_output if reuse_cond_output else None
        self.latent, offset = advance(
            self.method, schedule, unet, self.latent, problem.timestep, frozen, self.cond, target, guidance_scale,
            cond_output,
        )
        if offset is not None:
            self.offsets.append(offset)
        if self.step + 1 == self.method.start_step(len(self.pivot)):
            self.start_latent = self.latent.clone()
        self.null_embeddings.append(frozen.embeddings)
        if frozen.pooled is not None:
            self.null_pooled_embeddings.append(frozen.pooled)
        self.iterations.append(problem.iterations.clone())
        self.losses.append(problem.loss.clone())

    @property
    def slots(self) -> list[int]:
        """Indices of the slots that hold an image."""
        return self.valid.nonzero().flatten().tolist()

    def inversions(self, metadata: dict[str, Any]) -> list[Inversion]:
        """One `Inversion` per image (on CPU, empty slots left out), with `metadata` and the
        per-step statistics."""
        embeddings = torch.stack(self.null_embeddings, dim=1)  # [B, T, 77, D]
        pooled = torch.stack(self.null_pooled_embeddings, dim=1) if self.null_pooled_embeddings else None
        iterations = torch.stack(self.iterations, dim=1).cpu().tolist()
        losses = torch.stack(self.losses, dim=1).cpu().tolist()
        offsets = torch.stack(self.offsets, dim=1) if self.offsets else None  # [B, T, C, h, w]
        start = self.start_latent if self.method.start_step(len(self.pivot)) else self.pivot.z_T
        return [
            finished_inversion(
                start[b],
                self.pivot.z0[b],
                self.prompts[b],
                self.ids[b],
                metadata,
                embeddings[b],
                None if pooled is None else pooled[b],
                iterations[b],
                losses[b],
                None if offsets is None else offsets[b],
                self.pivot.latents[:, b] if self.method.stores_pivot else None,
                None if self.pivot.pair is None else self.pivot.pair[:, b],
            )
            for b in self.slots
        ]
