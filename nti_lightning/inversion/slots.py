"""Continuous batching of Null-text Inversion: slots whose images sit at their own timesteps.

A batch of images that walks its pivots in lockstep runs every timestep until its slowest image
stops, and keeps pushing the stopped images through the UNet. `SlotWalk` instead keeps a fixed
set of S slots, each holding one image at its own place in its walk (step i, inner iteration j):

* one *inner iteration* is one UNet forward/backward over the slots still optimising, each at
  its own timestep (the UNet embeds a timestep per row), with the per-image MSEs summed so that
  every image gets its own gradient, and one Adam update per slot (`RowAdam`: a step count and
  a learning rate `lr·(1 - i/100)` per slot, reset when the slot starts a step);
* a slot whose loss fell under its threshold (or that used its N iterations) freezes its null
  condition, takes its guided DDIM advance (batched with the other slots advancing at that
  moment) and starts its next step: the conditional output at its new latent, once, no grad;
* a slot whose image has finished all T steps hands the image back (`finished`) and takes the
  next one (`admit`).

New images enter in two moves. `prepare` computes the pivots of up to S images together (one
batched DDIM inversion: T UNet calls of S rows, as a lockstep batch pays) and queues them;
`admit` moves queued images into free slots. Slots free up one or two at a time, so computing
each newcomer's pivot on its own would cost T one-row calls per image; queuing a slot-count's
worth at once costs what a lockstep batch's pivot costs.

Every image goes through exactly the operations of the reference loop (docs/ALGORITHM.md), so
one image alone is bit for bit the reference, and the UNet rows an image costs are the
reference's: T pivot rows, per step one conditional row, one row per inner iteration, and two
advance rows. The slots never change shape: an idle slot is masked, not removed. With
`fixed_shapes`, every UNet call covers all S slots (idle ones masked): one shape per kind of
call, as CUDA graphs need, at the price of computing rows nobody uses.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.guidance import predict
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods import DEFAULT_METHOD, InversionMethod
from nti_lightning.inversion.null_text import early_stop_threshold, step_learning_rate
from nti_lightning.inversion.pivot import PivotTrajectory, ddim_invert
from nti_lightning.inversion.pivot_store import PivotStore, load_or_compute
from nti_lightning.inversion.row_adam import RowAdam
from nti_lightning.inversion.step import advance, finished_inversion, step_losses


@dataclass
class SlotImage:
    """One image's walk, held by a slot until all its T steps are done.

    Args:
        id (`str`): the image id.
        prompt (`str`): the source prompt.
        pixels (`torch.Tensor`): `[3, H, W]` input in [-1, 1].
        pivot (`PivotTrajectory`): its pivot (batch of one).
        payload (`Any`, *optional*): what the caller wants back with the result (e.g. its sample).
        null_embeddings, null_pooled_embeddings, iterations, losses, offsets: the per-step
            results so far (`offsets`: Direct Inversion's, else empty).
    """

    id: str
    prompt: str
    pixels: torch.Tensor
    pivot: PivotTrajectory
    payload: Any = None
    null_embeddings: list[torch.Tensor] = field(default_factory=list)
    null_pooled_embeddings: list[torch.Tensor] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    offsets: list[torch.Tensor] = field(default_factory=list)
    latent: Optional[torch.Tensor] = None  # the final latent, once done (the reconstruction)
    start_latent: Optional[torch.Tensor] = None  # the latent at the step edits start at, once there
    cond: Optional[Condition] = None  # its source condition, one row
    started: float = 0.0  # `time.perf_counter()` when it entered its slot

    def inversion(self, metadata: dict[str, Any], stores_pivot: bool = False) -> Inversion:
        """The finished image as an `Inversion` (on the CPU), with its pivot when `stores_pivot`."""
        pooled = torch.cat(self.null_pooled_embeddings) if self.null_pooled_embeddings else None
        return finished_inversion(
            (self.start_latent if self.start_latent is not None else self.pivot.z_T)[0],
            self.pivot.z0[0],
            self.prompt,
            self.id,
            metadata,
            torch.cat(self.null_embeddings),
            pooled,
            self.iterations,
            self.losses,
            torch.cat(self.offsets) if self.offsets else None,
            self.pivot.latents[:, 0] if stores_pivot else None,
            None if self.pivot.pair is None else self.pivot.pair[:, 0],
        )


class SlotWalk:
    """S slots walking their images' pivots, each at its own step and inner iteration.

    Args:
        schedule (`DDIMSchedule`): the DDIM schedule (T steps).
        null (`Sequence[torch.Tensor]`): the slots' current null condition, `[S, 77, D]` (and
            SDXL's `[S, P]`), leaf tensors that require grad (the LightningModule's parameters).
        empty (`Condition`): ∅, one row: where every step's optimisation starts for a new image.
        guidance_scale (`float`): w.
        num_inner_steps (`int`): N.
        epsilon (`float`): ε of the early stop (`loss < ε + i·2e-5`).
        learning_rate (`float`): Adam's rate at step 0, `lr·(1 - i/100)` at step i.
        method (`InversionMethod`, *optional*): the inversion method (defaults to Null-text's): where
            each step's null condition starts, whether it is optimised (otherwise every step is
            frozen as it starts) and where the walk goes on after a step.
        reuse_cond_output (`bool`, defaults to False): the advance reuses the step's conditional
            output instead of recomputing it with the frozen null (the reference recomputes it:
            one row fewer per step, results equal up to float rounding).
        fixed_shapes (`bool`, defaults to False): every UNet call covers all S slots, idle ones
            masked (the inner iteration, the advance, the conditional outputs and the pivots).
        pivot_store (`PivotStore`, *optional*): pivots read from (and written to) disk, computed
            only where none fits (`nti_lightning.inversion.pivot_store`).
    """

    def __init__(
        self,
        schedule: DDIMSchedule,
        null: Sequence[torch.Tensor],
        empty: Condition,
        guidance_scale: float,
        num_inner_steps: int,
        epsilon: float,
        learning_rate: float,
        method: Optional[InversionMethod] = None,
        reuse_cond_output: bool = False,
        fixed_shapes: bool = False,
        pivot_store: Optional[PivotStore] = None,
    ) -> None:
        self.schedule = schedule
        self.pivot_store = pivot_store
        self.method = method if method is not None else DEFAULT_METHOD
        self.null = list(null)
        self.empty = empty
        self.guidance_scale = guidance_scale
        self.num_inner_steps = num_inner_steps
        self.epsilon = epsilon
        self.learning_rate = learning_rate
        self.reuse_cond_output = reuse_cond_output
        self.fixed_shapes = fixed_shapes
        slots = self.null[0].shape[0]
        self.optimizer = RowAdam(self.null)
        self.images: list[Optional[SlotImage]] = [None] * slots
        self.waiting: deque[SlotImage] = deque()  # prepared (pivot computed), waiting for a slot
        self.step = torch.zeros(slots, dtype=torch.long)  # each slot's step i (host side: it picks timesteps)
        self.iteration = torch.zeros(slots, dtype=torch.long)
        self.loss = torch.full((slots,), float("nan"))
        self.optimising = torch.zeros(slots, dtype=torch.bool)  # in an inner loop
        self.latent: Optional[torch.Tensor] = None  # [S, C, h, w] current z̄ per slot
        self.target: Optional[torch.Tensor] = None  # [S, C, h, w] pivot latent of the current step
        self.cond_output: Optional[torch.Tensor] = None  # [S, C, h, w]
        self.cond: Optional[Condition] = None  # [S rows] source conditions
        self.unet_rows = 0  # UNet rows computed so far (forward passes of one latent)

    # ------------------------------------------------------------------------------ the slots
    @property
    def slots(self) -> int:
        return len(self.images)

    def free_slots(self) -> list[int]:
        return [s for s, image in enumerate(self.images) if image is None]

    @property
    def busy(self) -> bool:
        """Whether any slot holds an image, or a prepared image waits for one."""
        return bool(self.waiting) or any(image is not None for image in self.images)

    def call_rows(self, slots: Sequence[int]) -> list[int]:
        """The slots a UNet call covers: `slots`, or every slot under `fixed_shapes`."""
        return list(range(self.slots)) if self.fixed_shapes else list(slots)

    def timesteps(self, slots: Sequence[int]) -> torch.Tensor:
        """`[len(slots)]` current timestep of each slot (an empty slot's is a valid one, unused)."""
        return self.schedule.timesteps[self.step[list(slots)].clamp_max(self.schedule.num_inference_steps - 1)]

    # ------------------------------------------------------------------------- new images
    @torch.no_grad()
    def prepare(
        self,
        unet: UNet2DConditionModel,
        pixels: torch.Tensor,
        z0: torch.Tensor,
        cond: Condition,
        ids: Sequence[str],
        prompts: Sequence[str],
        payloads: Optional[Sequence[Any]] = None,
    ) -> None:
        """Computes the pivots of new images together and queues them for `admit`.

        Args:
            unet (`UNet2DConditionModel`): the denoiser.
            pixels (`torch.Tensor`): `[n, 3, H, W]` inputs in [-1, 1].
            z0 (`torch.Tensor`): `[n, C, h, w]` their VAE latents.
            cond (`Condition`): their n source conditions.
            ids, prompts (`Sequence[str]`): their ids and prompts.
            payloads (`Sequence`, *optional*): handed back with each finished image.
        """
        count = z0.shape[0]
        pivot = self.method.walk_pivot(unet, self.schedule, z0, cond, self.empty, ids)
        if pivot is None:  # the DDIM inversion, shared by the methods
            invert = lambda rows, rows_cond: self._invert(unet, rows, rows_cond)  # noqa: E731
            pivot = load_or_compute(self.pivot_store, invert, self.schedule, z0, cond, ids, prompts)
        for k in range(count):
            single = pivot.rows(k, k + 1)
            self.waiting.append(
                SlotImage(
                    ids[k], prompts[k], pixels[k].clone(), single, payloads[k] if payloads is not None else None,
                    cond=cond.rows(k).clone(),
                )
            )

    def _invert(self, unet: UNet2DConditionModel, z0: torch.Tensor, cond: Condition) -> PivotTrajectory:
        """The DDIM inversion of some new images (`prepare`'s, less those in the pivot store)."""
        count = z0.shape[0]
        if self.fixed_shapes and count < self.slots:  # pad the pivot's calls to S rows
            pad = self.slots - count
            pivot = ddim_invert(
                unet, self.schedule, torch.cat([z0, z0[:1].expand(pad, *z0.shape[1:])]),
                Condition.cat([cond, cond.rows(0).expand(pad)]),
            )
            self.unet_rows += self.slots * self.schedule.num_inference_steps
            return PivotTrajectory(latents=pivot.latents[:, :count], timesteps=pivot.timesteps)
        self.unet_rows += count * self.schedule.num_inference_steps
        return ddim_invert(unet, self.schedule, z0, cond)

    @torch.no_grad()
    def admit(self, unet: UNet2DConditionModel) -> list[int]:
        """Moves waiting images into free slots and starts their step 0; returns the slots filled."""
        slots = self.free_slots()[: len(self.waiting)]
        if not slots:
            return []
        images = [self.waiting.popleft() for _ in slots]
        z_T = torch.cat([image.pivot.z_T for image in images])
        cond = Condition.cat([image.cond for image in images])
        if self.latent is None:  # the slots' tensors take the first images' shapes
            shape = (self.slots, *z_T.shape[1:])
            self.latent = torch.zeros(shape, device=z_T.device)
            self.target = torch.zeros(shape, device=z_T.device)
            self.cond_output = torch.zeros(shape, device=z_T.device)
            self.cond = Condition.cat([cond.rows(0)] * self.slots).clone()
        index = torch.tensor(slots, device=z_T.device)
        self.latent[index] = z_T.float()
        self._set_cond(index, cond)
        now = time.perf_counter()
        for slot, image in zip(slots, images):
            image.started = now
            self.images[slot] = image
            self.step[slot] = 0
        start = self.method.start_condition(cond, self.empty)
        for param, value in zip(self.null, start.tunable()):
            param.data[index] = value.to(param.dtype)
        self._start_steps(unet, slots)
        return slots

    def _set_cond(self, index: torch.Tensor, cond: Condition) -> None:
        self.cond.embeddings[index] = cond.embeddings
        if cond.pooled is not None:
            self.cond.pooled[index] = cond.pooled
            self.cond.time_ids[index] = cond.time_ids

    @torch.no_grad()
    def _start_steps(self, unet: UNet2DConditionModel, slots: Sequence[int]) -> None:
        """Fresh Adam, target and conditional output for `slots` at their current step."""
        if not slots:
            return
        slots = list(slots)
        index = torch.tensor(slots, device=self.latent.device)
        steps = self.step[slots].tolist()
        for slot, step in zip(slots, steps):
            image = self.images[slot]
            self.target[slot] = image.pivot.latents[self.schedule.num_inference_steps - 1 - step, 0]
        rows = self.call_rows(slots)
        outputs = predict(
            unet, self.latent[rows], self.timesteps(rows), self.cond.rows(torch.tensor(rows, device=index.device))
        )
        self.cond_output[index] = outputs if rows == slots else outputs[index]
        self.unet_rows += len(rows)
        self.optimizer.reset(slots, [step_learning_rate(step, self.learning_rate) for step in steps])
        self.iteration[slots] = 0
        self.loss[slots] = float("nan")
        self.optimising[slots] = self.method.optimises

    # ------------------------------------------------------------------------ optimisation
    def null_condition(self, index: torch.Tensor) -> Condition:
        """The current null condition of the slots `index` (differentiable)."""
        return self.cond.rows(index).with_tunable(*(param[index] for param in self.null))

    def losses(self, unet: UNet2DConditionModel, slots: Sequence[int]) -> torch.Tensor:
        """Per-slot MSE of the guided step with the current null condition, `[len(slots)]` fp32."""
        index = torch.tensor(list(slots), device=self.latent.device)
        self.unet_rows += len(slots)
        return step_losses(
            self.schedule, unet, self.latent[index], self.timesteps(slots), self.null_condition(index),
            self.cond_output[index], self.target[index], self.guidance_scale,
        )

    @torch.no_grad()
    def update(self, slots: Sequence[int], losses: torch.Tensor) -> list[int]:
        """After `backward`: one Adam step of `slots`, then `record`."""
        self.optimizer.step(rows=list(slots))
        self.optimizer.zero_grad(set_to_none=True)
        return self.record(slots, losses)

    @torch.no_grad()
    def record(self, slots: Sequence[int], losses: torch.Tensor) -> list[int]:
        """Books one inner iteration of `slots` (after their Adam step, with the losses from before
        it); returns the slots whose step is over (loss below the threshold, or N iterations used)."""
        slots = list(slots)
        values = losses.detach().float().cpu()
        stopped = []
        for slot, value in zip(slots, values.tolist()):
            self.iteration[slot] += 1
            self.loss[slot] = value
            threshold = early_stop_threshold(int(self.step[slot]), self.epsilon)
            if value < threshold or int(self.iteration[slot]) >= self.num_inner_steps:
                self.optimising[slot] = False
                stopped.append(slot)
        return stopped

    def optimising_slots(self) -> list[int]:
        return self.optimising.nonzero().flatten().tolist()

    def ready_slots(self) -> list[int]:
        """Slots whose current step is optimised (or needs no optimisation) and must advance."""
        return [s for s, image in enumerate(self.images) if image is not None and not bool(self.optimising[s])]

    # ---------------------------------------------------------------------- freeze, advance
    @torch.no_grad()
    def advance(self, unet: UNet2DConditionModel, slots: Sequence[int]) -> list[SlotImage]:
        """Freezes the null condition of `slots`, takes their guided DDIM steps together and starts
        their next steps; returns the images that finished their last step (their slots are freed)."""
        slots = list(slots)
        if not slots:
            return []
        index = torch.tensor(slots, device=self.latent.device)
        rows = self.call_rows(slots)
        every = torch.tensor(rows, device=index.device)
        frozen = self.null_condition(every).clone().to(dtype=torch.float32)
        cond_output = self.cond_output[every] if self.reuse_cond_output else None
        stepped, offsets = advance(
            self.method, self.schedule, unet, self.latent[every], self.timesteps(rows), frozen, self.cond.rows(every),
            self.target[every], self.guidance_scale, cond_output,
        )
        if rows != slots:  # fixed shapes: every slot was computed, the advancing ones are kept
            frozen, stepped = frozen.rows(index), stepped[index]
            offsets = None if offsets is None else offsets[index]
        self.latent[index] = stepped
        self.unet_rows += len(rows) * (1 if self.reuse_cond_output else 2)
        finished, going_on = [], []
        start_step = self.method.start_step(self.schedule.num_inference_steps)
        for k, slot in enumerate(slots):
            image = self.images[slot]
            image.null_embeddings.append(frozen.embeddings[k : k + 1])
            if frozen.pooled is not None:
                image.null_pooled_embeddings.append(frozen.pooled[k : k + 1])
            image.iterations.append(int(self.iteration[slot]))
            image.losses.append(float(self.loss[slot]))
            if offsets is not None:
                image.offsets.append(offsets[k : k + 1])
            self.step[slot] += 1
            if int(self.step[slot]) == start_step:
                image.start_latent = self.latent[slot : slot + 1].clone()
            if int(self.step[slot]) == self.schedule.num_inference_steps:
                image.latent = self.latent[slot : slot + 1].clone()
                finished.append(image)
                self.images[slot] = None
                self.optimising[slot] = False
            else:
                going_on.append(slot)
        self._start_steps(unet, going_on)
        return finished
