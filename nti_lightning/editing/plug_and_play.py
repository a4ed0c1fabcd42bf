"""Plug-and-Play (Tumanyan et al., CVPR 2023): the source's features injected into the target.

A source branch runs beside the edit: the source's latent at each step, under the prompt ""
(no guidance), whose decoder features replace the target's in both halves of classifier-free
guidance (MichalGeyer/pnp-diffusers `pnp.py`, `pnp_utils.py`; PnP Inversion `run_editing_pnp.py`):

* the residual branch of the decoder's block 4 of 12 (`up_blocks[1].resnets[1]` in SD 1.x: its
  second convolution's output, before the skip connection is added) for the first 80% of steps;
* the self-attention queries and keys of decoder blocks 4 to 11 for the first 50%.

The target rows take the negative prompt "ugly, blurry, black, low res, unrealistic" as their
unconditional input. A UNet with another number of decoder blocks n (3 per up block in SD 1.x:
12) injects at block n // 3 and from it on (the tiny model: 4 blocks, features of
`up_blocks[0].resnets[1]`, attention of both of `up_blocks[1]`'s layers).

The source branch's latents are each job's source prompt sampled alone as its inversion's method
reconstructs it (`SamplingInputs.source_trajectory`): with Direct Inversion its pivot trajectory,
the inversion latents the authors' code feeds (`pnp-diffusers` saves them, PnP Inversion's
Direct row passes them); PnP Inversion's DDIM row feeds the DDIM reconstruction at w = 1 and, as
its script indexes it, one step ahead of the step's timestep (`source_guidance_scale: 1`,
`source_offset: 1`: the edit then also starts from the reconstruction's first latent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from nti_lightning.diffusion.condition import Condition
from nti_lightning.editing.attention import AttentionLayer, controlled_attention
from nti_lightning.editing.editor import Editor, EditorSettings, SamplingInputs
from nti_lightning.inversion.methods.base import is_number
from nti_lightning.inversion.sampling import SamplingRule, StepCallback, sample

#: The authors' negative prompt (`run_pnp`).
NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"


@dataclass(frozen=True)
class PlugAndPlay(EditorSettings):
    """Plug-and-Play's settings for one edit.

    Args:
        feature_steps (`float`, defaults to 0.8): pnp_f_t, the share of the steps (the first ones)
            with the residual features injected.
        attention_steps (`float`, defaults to 0.5): pnp_attn_t, the share with the self-attention
            queries and keys injected.
        negative_prompt (`str`, defaults to the authors'): the target rows' unconditional prompt.
        source_prompt (`str`, defaults to ""): the source branch's prompt.
        source_guidance_scale (`float`, *optional*): w of the source branch's reconstruction
            (`SamplingInputs.source_trajectory`); by default the edit's (Direct Inversion's
            offsets need the w they were made with); PnP Inversion's DDIM row: 1.
        source_offset (`int`, defaults to 0): 0, the source branch's latent of step i is the one at
            the step's timestep; 1, one step ahead (PnP Inversion's DDIM row, as its script indexes
            the reconstruction), the edit starting from the reconstruction's first latent.
    """

    feature_steps: float = 0.8
    attention_steps: float = 0.5
    negative_prompt: str = NEGATIVE_PROMPT
    source_prompt: str = ""
    source_guidance_scale: Optional[float] = None
    source_offset: int = 0

    name: ClassVar[str] = "pnp"
    label: ClassVar[str] = "Plug-and-Play"

    @classmethod
    def benchmark_options(cls, method: Optional[str]) -> dict[str, Any]:
        # run_editing_pnp.py's DDIM row: the reconstruction at w = 1, one step ahead.
        return {"source_guidance_scale": 1.0, "source_offset": 1} if method == "ddim" else {}

    def __post_init__(self) -> None:
        for option in ("feature_steps", "attention_steps"):
            value = getattr(self, option)
            if not is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"pnp: {option} must be a share of the steps from 0 to 1, got {value!r}")
        for option in ("negative_prompt", "source_prompt"):
            if not isinstance(getattr(self, option), str):
                raise ValueError(f"pnp: {option} must be a prompt (a string), got {getattr(self, option)!r}")
        scale = self.source_guidance_scale
        if scale is not None and (not is_number(scale) or scale < 0):
            raise ValueError(f"pnp: source_guidance_scale must be a number >= 0 or null, got {scale!r}")
        if self.source_offset not in (0, 1) or isinstance(self.source_offset, bool):
            raise ValueError(f"pnp: source_offset must be 0 or 1, got {self.source_offset!r}")

    def check_edit(self, prompts: Sequence[str], is_xl: bool, rule: SamplingRule, method_label: str) -> None:
        if is_xl:
            raise ValueError(
                "the Plug-and-Play editor runs on SD 1.x and 2.x UNets, as its authors' code; this model is SDXL"
            )
        super().check_edit(prompts, is_xl, rule, method_label)


def injection_blocks(unet: Any) -> tuple[tuple[int, int], list[str]]:
    """Where Plug-and-Play injects in `unet`: the decoder block `(up block, resnet)` whose residual
    features it takes, and the self-attention processors whose queries and keys it takes (block
    n // 3 of the decoder's n, and every block from it on).

    Args:
        unet (`UNet2DConditionModel`): an SD 1.x or 2.x UNet.
    """
    blocks = [(i, j) for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]
    first = len(blocks) // 3
    processors = set(unet.attn_processors)
    names = [
        f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.processor"
        for i, j in blocks[first:]
        if f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.processor" in processors
    ]
    return blocks[first], names


class PlugAndPlayEditor(Editor):
    """Plug-and-Play over a batch of edits, every job with its own source branch row (its first).

    Args:
        rows (`EditRows`): the batch's rows; every job's settings a `PlugAndPlay`.
    """

    edits_inputs = True
    settings_type = PlugAndPlay

    def sample(self, inputs: SamplingInputs) -> torch.Tensor:
        unet, steps = inputs.unet, inputs.schedule.num_inference_steps
        settings: list[PlugAndPlay] = list(self.rows.settings)
        spans = self.rows.spans
        (block, resnet), layers = injection_blocks(unet)
        self.attention_layers = set(layers)
        scales = torch.tensor([
            s.source_guidance_scale if s.source_guidance_scale is not None else inputs.guidance_scale
            for s in settings
        ])
        self.trajectory = inputs.source_trajectory(scales)  # [T + 1, jobs, C, h, w]
        self.offsets = [s.source_offset for s in settings]
        rows, device = self.rows.rows, inputs.z_T.device
        # Per step, the rows that take the source's features (both halves) and the row each reads.
        self.feature_steps = [int(steps * s.feature_steps) for s in settings]
        self.attention_steps = [int(steps * s.attention_steps) for s in settings]
        self.sources = torch.arange(2 * rows)
        for start, end in spans:
            self.sources[start + 1 : end] = rows + start  # the source's conditional row ("")
            self.sources[rows + start + 1 : rows + end] = rows + start
        self.sources = self.sources.to(device)

        # The source branch's prompt on each job's first row; the negative prompt on its targets.
        # (The source row's unconditional half keeps the job's null: only its conditional half's
        # features are read, and its latent is put back on the trajectory after every step.)
        encoded = inputs.encode([s.source_prompt for s in settings] + [s.negative_prompt for s in settings])
        branch, negative = encoded.embeddings.chunk(2)
        cond = inputs.cond.embeddings.clone()
        z = inputs.z_T.clone()
        for k, (start, end) in enumerate(spans):
            cond[start] = branch[k]
            z[start:end] = self.trajectory[self.offsets[k], k]
        nulls = []
        for null in inputs.nulls:
            embeddings = null.embeddings.expand(rows, -1, -1).clone()
            for k, (start, end) in enumerate(spans):
                embeddings[start + 1 : end] = negative[k]
            nulls.append(Condition(embeddings))
        self._enter_step(0)
        module = unet.up_blocks[block].resnets[resnet].conv2
        handle = module.register_forward_hook(self._inject_features)
        try:
            with controlled_attention(unet, self):
                latents = sample(
                    unet, inputs.schedule, z, nulls, Condition(cond), inputs.guidance_scale, on_step=self._end_step
                )
        finally:
            handle.remove()
        return latents

    def _enter_step(self, step: int) -> None:
        """The step's two gathers, made once for all its layers."""
        self.step = step
        self.feature_index = self._injected(self.feature_steps)
        self.attention_index = self._injected(self.attention_steps)

    def _injected(self, windows: Sequence[int]) -> Optional[torch.Tensor]:
        """`[2 * rows]` the row each row of both halves takes from at this step (None if none)."""
        index = torch.arange(2 * self.rows.rows, device=self.sources.device)
        taken = False
        for (start, end), last in zip(self.rows.spans, windows):
            if self.step < last:
                for half in (0, self.rows.rows):
                    index[half + start + 1 : half + end] = self.sources[half + start + 1 : half + end]
                taken = True
        return index if taken else None

    def _inject_features(self, module: Any, args: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
        """The residual branch's output (a forward hook of its second convolution)."""
        index = self.feature_index
        return None if index is None else output.index_select(0, index)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, layer: AttentionLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer.is_cross or layer.name not in self.attention_layers:
            return query, key, value
        index = self.attention_index
        if index is None:
            return query, key, value
        shape = (-1, heads, *query.shape[1:])
        query = query.reshape(shape).index_select(0, index).reshape(query.shape)
        key = key.reshape((-1, heads, *key.shape[1:])).index_select(0, index).reshape(key.shape)
        return query, key, value

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        return probs

    def _end_step(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        """Each source row back on its branch's latent for the next step."""
        last = self.trajectory.shape[0] - 1
        latents = latents.clone()
        for k, (start, _) in enumerate(self.rows.spans):
            latents[start] = self.trajectory[min(step + 1 + self.offsets[k], last), k]
        self._enter_step(step + 1)
        return latents

    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        return self._end_step
