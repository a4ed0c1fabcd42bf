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
  next one (`admit`: VAE latents in, pivot computed, batched over the images admitted together).

Every image goes through exactly the operations of the reference loop (docs/ALGORITHM.md), so
one image alone is bit for bit the reference, and the UNet rows an image costs are the
reference's: T pivot rows, per step one conditional row, one row per inner iteration, and two
advance rows. The slots never change shape: an idle slot is masked, not removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule, prev_step
from nti_lightning.diffusion.guidance import guide, guided_step, predict
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.null_text import early_stop_threshold, step_learning_rate
from nti_lightning.inversion.pivot import PivotTrajectory, ddim_invert
from nti_lightning.inversion.row_adam import RowAdam


@dataclass
class SlotImage:
    """One image's walk, held by a slot until all its T steps are done.

    Args:
        id (`str`): the image id.
        prompt (`str`): the source prompt.
        pixels (`torch.Tensor`): `[3, H, W]` input in [-1, 1].
        pivot (`PivotTrajectory`): its pivot (batch of one).
        payload (`Any`, *optional*): what the caller wants back with the result (e.g. its sample).
        null_embeddings, null_pooled_embeddings, iterations, losses: the per-step results so far.
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
    latent: Optional[torch.Tensor] = None  # the final latent, once done (the reconstruction)
    cond: Optional[Condition] = None  # its source condition, one row
    started: float = 0.0  # `time.perf_counter()` when it entered its slot

    def inversion(self, metadata: dict[str, Any]) -> Inversion:
        """The finished image as an `Inversion` (on the CPU)."""
        pooled = torch.cat(self.null_pooled_embeddings).cpu() if self.null_pooled_embeddings else None
        return Inversion(
            z_T=self.pivot.z_T[0].cpu().clone(),
            null_embeddings=torch.cat(self.null_embeddings).cpu(),
            source_latent=self.pivot.z0[0].cpu().clone(),
            prompt=self.prompt,
            metadata={**metadata, "id": self.id, "inner_iterations": list(self.iterations), "final_losses": list(self.losses)},
            null_pooled_embeddings=pooled,
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
        optimise (`bool`, defaults to True): False for the methods without optimisation: every
            step is frozen as it starts (∅, or the prompt's own condition with `negative_prompt`).
        negative_prompt (`bool`, defaults to False): start from the prompt's condition C instead of ∅.
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
        optimise: bool = True,
        negative_prompt: bool = False,
    ) -> None:
        self.schedule = schedule
        self.null = list(null)
        self.empty = empty
        self.guidance_scale = guidance_scale
        self.num_inner_steps = num_inner_steps
        self.epsilon = epsilon
        self.learning_rate = learning_rate
        self.optimise = optimise
        self.negative_prompt = negative_prompt
        slots = self.null[0].shape[0]
        self.optimizer = RowAdam(self.null)
        self.images: list[Optional[SlotImage]] = [None] * slots
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
        """Whether any slot holds an image."""
        return any(image is not None for image in self.images)

    def timesteps(self, slots: Sequence[int]) -> torch.Tensor:
        """`[len(slots)]` current timestep of each slot (an empty slot's is a valid one, unused)."""
        return self.schedule.timesteps[self.step[list(slots)].clamp_max(self.schedule.num_inference_steps - 1)]

    # ------------------------------------------------------------------------- new images
    @torch.no_grad()
    def admit(
        self,
        unet: UNet2DConditionModel,
        slots: Sequence[int],
        pixels: torch.Tensor,
        z0: torch.Tensor,
        cond: Condition,
        ids: Sequence[str],
        prompts: Sequence[str],
        payloads: Optional[Sequence[Any]] = None,
    ) -> None:
        """Puts new images into free `slots`: computes their pivots together and starts their step 0.

        Args:
            unet (`UNet2DConditionModel`): the denoiser.
            slots (`Sequence[int]`): free slots, one per image.
            pixels (`torch.Tensor`): `[n, 3, H, W]` inputs in [-1, 1].
            z0 (`torch.Tensor`): `[n, C, h, w]` their VAE latents.
            cond (`Condition`): their n source conditions.
            ids, prompts (`Sequence[str]`): their ids and prompts.
            payloads (`Sequence`, *optional*): handed back with each finished image.
        """
        slots = list(slots)
        pivot = ddim_invert(unet, self.schedule, z0, cond)
        self.unet_rows += len(slots) * self.schedule.num_inference_steps
        if self.latent is None:  # the slots' tensors take the first images' shapes
            shape = (self.slots, *z0.shape[1:])
            self.latent = torch.zeros(shape, device=z0.device)
            self.target = torch.zeros(shape, device=z0.device)
            self.cond_output = torch.zeros(shape, device=z0.device)
            self.cond = Condition.cat([cond.rows(0).to(device=z0.device)] * self.slots).clone()
        index = torch.tensor(slots, device=z0.device)
        self.latent[index] = pivot.z_T.float()
        self._set_cond(index, cond)
        for k, slot in enumerate(slots):
            single = PivotTrajectory(latents=pivot.latents[:, k : k + 1].clone(), timesteps=pivot.timesteps)
            self.images[slot] = SlotImage(
                ids[k], prompts[k], pixels[k].clone(), single, payloads[k] if payloads is not None else None,
                cond=cond.rows(k).clone(), started=time.perf_counter(),
            )
            self.step[slot] = 0
        start = cond if self.negative_prompt else self.empty.expand(len(slots))
        for param, value in zip(self.null, start.tunable()):
            param.data[index] = value.to(param.dtype)
        self._start_steps(unet, slots)

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
        self.cond_output[index] = predict(unet, self.latent[index], self.timesteps(slots), self.cond.rows(index))
        self.unet_rows += len(slots)
        self.optimizer.reset(slots, [step_learning_rate(step, self.learning_rate) for step in steps])
        self.iteration[slots] = 0
        self.loss[slots] = float("nan")
        self.optimising[slots] = self.optimise

    # ------------------------------------------------------------------------ optimisation
    def null_condition(self, index: torch.Tensor) -> Condition:
        """The current null condition of the slots `index` (differentiable)."""
        return self.cond.rows(index).with_tunable(*(param[index] for param in self.null))

    def losses(self, unet: UNet2DConditionModel, slots: Sequence[int]) -> torch.Tensor:
        """Per-slot MSE of the guided step with the current null condition, `[len(slots)]` fp32."""
        index = torch.tensor(list(slots), device=self.latent.device)
        timesteps = self.timesteps(slots)
        latent = self.latent[index]
        uncond_output = predict(unet, latent, timesteps, self.null_condition(index))
        self.unet_rows += len(slots)
        with torch.autocast(device_type=latent.device.type, enabled=False):
            guided = guide(uncond_output.float(), self.cond_output[index], self.guidance_scale)
            predicted = prev_step(self.schedule, guided, timesteps, latent)
            return F.mse_loss(predicted, self.target[index], reduction="none").flatten(1).mean(1)

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
        frozen = self.null_condition(index).clone().to(dtype=torch.float32)
        self.latent[index] = guided_step(
            self.schedule, unet, self.latent[index], self.timesteps(slots), frozen, self.cond.rows(index), self.guidance_scale
        )
        self.unet_rows += 2 * len(slots)
        finished, going_on = [], []
        for k, slot in enumerate(slots):
            image = self.images[slot]
            image.null_embeddings.append(frozen.embeddings[k : k + 1])
            if frozen.pooled is not None:
                image.null_pooled_embeddings.append(frozen.pooled[k : k + 1])
            image.iterations.append(int(self.iteration[slot]))
            image.losses.append(float(self.loss[slot]))
            self.step[slot] += 1
            if int(self.step[slot]) == self.schedule.num_inference_steps:
                image.latent = self.latent[slot : slot + 1].clone()
                finished.append(image)
                self.images[slot] = None
                self.optimising[slot] = False
            else:
                going_on.append(slot)
        self._start_steps(unet, going_on)
        return finished
