"""Pix2Pix-Zero (Parmar et al., SIGGRAPH 2023): an edit direction in the text embedding, and
cross-attention guidance that keeps the source's structure.

As the benchmark runs it (PnP Inversion `run_editing_pix2pix_zero.py` with
`models/pix2pix_zero/edit_pipeline.py`, after pix2pixzero/pix2pix-zero):

* the edit's condition is the caption's embedding plus the direction emb(target) - emb(source)
  (token by token, the prompts' embeddings averaged over their one sentence each); the caption is
  also the negative prompt (the unconditional input) of both passes;
* a reference pass samples the caption from z_T (both halves the caption) and keeps every
  cross-attention map of every step;
* the edit pass, at each step, takes one gradient step on its latent (both halves, lr 0.1) against
  the squared distance of its cross-attention maps to the reference's (summed over positions and
  tokens, averaged over heads and halves, summed over layers), then the guided DDIM step from the
  unconditional half's latent with the noise predicted at the moved latents;
* with Direct Inversion (or `retrace` on an inversion that keeps its trajectory, such as
  Pix2Pix-Zero's own regularised DDIM inversion, `method: pix2pix_zero`) the reference pass is put
  back on the inversion's trajectory after each step and the edit takes the same offsets.

The authors caption the image with BLIP, whose weights are not at hand offline: the caption is
the source prompt unless given (`caption`). The two passes run in lockstep here (the reference's
maps of one step at a time, not all T steps' kept), many edits batched: each edit's loss depends
on its own rows only, so its gradient is the one it gets alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import prev_step
from nti_lightning.diffusion.guidance import guide, guided_step, predict
from nti_lightning.editing.attention import AttentionLayer, controlled_attention
from nti_lightning.editing.editor import Editor, EditorSettings, EditRows, SamplingInputs
from nti_lightning.inversion.methods.base import is_number
from nti_lightning.inversion.sampling import SamplingRule, StepCallback

#: Pix2Pix-Zero's own inversion method (`nti_lightning.inversion.methods.pix2pix_zero`), which its
#: benchmark rows edit.
PIX2PIX_ZERO_INVERSION = "pix2pix_zero"


@dataclass(frozen=True)
class Pix2PixZero(EditorSettings):
    """Pix2Pix-Zero's settings for one edit.

    Args:
        guidance_amount (`float`, defaults to 0.1): the cross-attention guidance's step size (the
            authors' `xa_guidance`, the SGD learning rate on the latent).
        caption (`str`, *optional*): the image's caption (the authors' BLIP caption); defaults to
            the source prompt.
        retrace (`bool`, defaults to False): put the reference pass back on the inversion's stored
            trajectory after every step, the edit taking the same offsets (PnP Inversion's Direct +
            Pix2Pix-Zero row, on a Pix2Pix-Zero inversion). A Direct Inversion is retraced whatever
            this says (its offsets are what it is).
    """

    guidance_amount: float = 0.1
    caption: Optional[str] = None
    retrace: bool = False

    name: ClassVar[str] = "p2p_zero"
    label: ClassVar[str] = "Pix2Pix-Zero"

    @classmethod
    def benchmark_options(cls, method: Optional[str]) -> dict[str, Any]:
        # run_editing_pix2pix_zero.py: guidance 0.1; its Direct row retraces the inversion.
        return {"guidance_amount": 0.1, "retrace": method == "direct"}

    @classmethod
    def benchmark_inversion(cls, method: str) -> str:
        # Its DDIM and Direct rows both edit its own regularised DDIM inversion.
        return PIX2PIX_ZERO_INVERSION if method in ("ddim", "direct") else method

    def __post_init__(self) -> None:
        amount = self.guidance_amount
        if not is_number(amount) or amount < 0:
            raise ValueError(f"p2p_zero: guidance_amount must be a number >= 0, got {amount!r}")
        if self.caption is not None and not isinstance(self.caption, str):
            raise ValueError(f"p2p_zero: caption must be a prompt (a string) or null, got {self.caption!r}")
        if not isinstance(self.retrace, bool):
            raise ValueError(f"p2p_zero: retrace must be true or false, got {self.retrace!r}")

    def check_edit(self, prompts: Sequence[str], is_xl: bool, rule: SamplingRule, method_label: str) -> None:
        if is_xl:
            raise ValueError(
                "the Pix2Pix-Zero editor runs on SD 1.x and 2.x UNets, as its authors' code; this model is SDXL"
            )
        super().check_edit(prompts, is_xl, rule, method_label)
        unchanged = [target for target in prompts[1:] if target == prompts[0]]
        if unchanged:
            raise ValueError(
                f"Pix2Pix-Zero edits along the difference of the target and source prompts, and the target "
                f"{unchanged[0]!r} changes no word of the source"
            )


class Pix2PixZeroEditor(Editor):
    """Pix2Pix-Zero over a batch of edits: every job's first row is its reference pass, its other
    rows its edits (one target prompt each).

    Args:
        rows (`EditRows`): the batch's rows; every job's settings a `Pix2PixZero`.
    """

    sees_all_rows = True
    settings_type = Pix2PixZero

    def __init__(self, rows: EditRows) -> None:
        super().__init__(rows)
        self.mode = "off"
        self.reference: dict[AttentionLayer, torch.Tensor] = {}
        self.loss: Optional[torch.Tensor] = None

    def sample(self, inputs: SamplingInputs) -> torch.Tensor:
        unet, schedule, w = inputs.unet, inputs.schedule, inputs.guidance_scale
        settings: list[Pix2PixZero] = list(self.rows.settings)
        spans, rows = self.rows.spans, self.rows.rows
        device = inputs.z_T.device
        sources = [start for start, _ in spans]
        targets = [row for start, end in spans for row in range(start + 1, end)]
        # Per target: its job.
        jobs = [k for k, (start, end) in enumerate(spans) for _ in range(start + 1, end)]
        self.target_jobs = torch.tensor(jobs, device=device)  # on the device once: the loss reads it every layer
        embeddings = inputs.cond.embeddings
        captions = [s.caption for s in settings]
        if any(caption is not None for caption in captions):
            given = inputs.encode([c if c is not None else "" for c in captions]).embeddings
            caption = torch.stack(
                [given[k] if c is not None else embeddings[sources[k]] for k, c in enumerate(captions)]
            )
        else:
            caption = embeddings[sources]
        # The edit's condition: the caption plus the direction target - source (as the authors add it).
        direction = embeddings[targets] - embeddings[sources].index_select(0, self.target_jobs)
        edit_cond = Condition(caption.index_select(0, self.target_jobs) + direction)
        caption_cond = Condition(caption)
        target_caption = Condition(caption.index_select(0, self.target_jobs))
        both_conditions = torch.cat([target_caption.embeddings, edit_cond.embeddings])
        lr = torch.tensor([settings[k].guidance_amount for k in jobs], device=device)
        lr = torch.cat([lr, lr]).view(-1, 1, 1, 1)

        # Which jobs' reference passes retrace their inversion: Direct Inversion's, and those asked to.
        retraced = [bool(f) or s.retrace for f, s in zip(inputs.follows_pivot, settings)]
        trajectory = inputs.source_trajectory(torch.full((len(spans),), float(w))) if any(retraced) else None
        follows = torch.tensor([float(f) for f in retraced], device=device).view(-1, 1, 1, 1)

        reference = inputs.z_T[sources].float()
        edits = inputs.z_T[targets].float()
        for store in self.rows.stores:
            if store is not None:
                store.reset()
        with controlled_attention(unet, self):
            for step, timestep in enumerate(schedule.timesteps.tolist()):
                # The reference pass: the caption in both halves, its maps kept for this step.
                self.mode = "record"
                with torch.no_grad():
                    stepped = guided_step(schedule, unet, reference, timestep, caption_cond, caption_cond, w)
                offsets = None
                if trajectory is not None:
                    offsets = (trajectory[step + 1].to(device) - stepped) * follows
                    stepped = stepped + offsets
                reference = stepped
                # The edit pass: one gradient step on both halves' latents towards the reference's maps.
                self.mode = "loss"
                self.loss = None
                # Predict runs under inference mode: its tensors are cloned out of it to take a gradient.
                with torch.inference_mode(False), torch.enable_grad():
                    moved = torch.cat([edits, edits]).clone().requires_grad_(True)
                    predict(unet, moved, timestep, Condition(both_conditions.clone()))
                    if self.loss is not None:
                        (gradient,) = torch.autograd.grad(self.loss, moved)
                        moved = moved.detach() - lr * gradient
                self.mode = "off"
                moved = moved.detach()
                with torch.no_grad():
                    uncond_output, cond_output = predict(unet, moved, timestep, Condition(both_conditions)).chunk(2)
                    edits = prev_step(schedule, guide(uncond_output, cond_output, w), timestep, moved[: len(targets)])
                if offsets is not None:
                    edits = edits + offsets.index_select(0, self.target_jobs)
                self.step_hook()(step, timestep, edits)
        self.reference = {}
        latents = torch.empty(rows, *edits.shape[1:], device=device)
        latents[sources] = reference
        latents[targets] = edits
        return latents

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """All rows' maps: kept (reference pass) or measured against the kept ones (edit pass)."""
        if not layer.is_cross or self.mode == "off":
            return probs
        if self.mode == "record":
            self.reference[layer] = probs.detach()
            jobs = probs.shape[0] // 2
            for k, store in enumerate(self.rows.stores):
                if store is not None:  # the caption's maps: the source row's picture
                    store.record(probs[jobs + k : jobs + k + 1].detach(), layer)
            return probs
        # [2 E, heads, q, keys]: each target's halves against its job's reference halves.
        jobs = self.reference[layer].shape[0] // 2
        job = self.target_jobs
        reference = self.reference[layer].index_select(0, torch.cat([job, job + jobs]))
        per_row = ((probs - reference) ** 2).sum((2, 3))  # [2 E, heads]
        loss = per_row.sum() / (2 * probs.shape[1])  # each target: the mean over its 2 x heads rows
        self.loss = loss if self.loss is None else self.loss + loss
        return probs

    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        """The stores' end of step, then `after` (its own loop, `sample`, ends its steps itself)."""

        def on_step(step: int, timestep: int, latents: torch.Tensor) -> Optional[torch.Tensor]:
            for store in self.rows.stores:
                if store is not None:
                    store.end_step()
            return after(step, timestep, latents) if after is not None else None

        return on_step
