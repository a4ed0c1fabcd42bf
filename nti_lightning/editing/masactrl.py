"""MasaCtrl: mutual self-attention control (Cao et al., ICCV 2023), for one edit or many.

From denoising step S and self-attention layer L on, every target row's queries attend to its
source row's keys and values instead of its own, in each half of classifier-free guidance
(TencentARC/MasaCtrl `masactrl/masactrl.py`, `MutualSelfAttentionControl`): the target keeps the
source's content and texture while its own prompt sets the layout. Cross-attention is left alone.

The authors count steps of a 50-step run and self-attention layers of SD 1.x's 16 (their layer
counter counts every attention call and halves it); S and L are given in those terms and map to
a run of T steps and a UNet of n self-attention layers by their share (`by_share`): S = 4, L = 10
(the benchmark's, PnP Inversion `run_editing_masactrl.py`) are steps 4.. of 50 and layers 10..15
of SD 1.5's 16 (the decoder's last six), step 1 of 10 and layer 3 of the tiny model's 4, layer 44
of SDXL's 70 (the first of the authors' SDXL settings, 44, 54 and 64; `layer_count: 70` gives
SDXL's layers in its own numbering).

The benchmark runs it with the source branch's prompt "" (the image inverted with "" too) and,
with Direct Inversion, the source branch's offsets: `nti bench` does so; an edit of any inversion
takes its source prompt first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from nti_lightning.editing.attention import AttentionLayer, by_share, self_attention_layers
from nti_lightning.editing.editor import Editor, EditorSettings, EditRows, SamplingInputs, then
from nti_lightning.inversion.methods.base import is_count
from nti_lightning.inversion.sampling import StepCallback

#: The authors' run: 50 steps, SD 1.x's 16 self-attention layers.
REFERENCE_STEPS = 50
REFERENCE_LAYERS = 16


@dataclass(frozen=True)
class MasaCtrl(EditorSettings):
    """MasaCtrl's settings for one edit.

    Args:
        start_step (`int`, defaults to 4): S, the first controlled step, of a 50-step run (mapped
            to T steps by its share).
        start_layer (`int`, defaults to 10): L, the first controlled self-attention layer, of
            `layer_count` (mapped to the UNet's count by its share).
        layer_count (`int`, defaults to 16): the layers `start_layer` counts: SD 1.x's 16 (the
            authors' SD setting; 10 of 16 is layer 44 of SDXL's 70), or 70 to give SDXL's layers as
            the authors' SDXL script does (44, 54, 64).
    """

    start_step: int = 4
    start_layer: int = 10
    layer_count: int = REFERENCE_LAYERS

    name: ClassVar[str] = "masactrl"
    label: ClassVar[str] = "MasaCtrl"
    runs_any_rule: ClassVar[bool] = True
    # run_editing_masactrl.py: the source branch's prompt "" (the image inverted with it too), S 4, L 10.
    benchmark_source_prompt: ClassVar[Optional[str]] = ""

    @classmethod
    def benchmark_options(cls, method: Optional[str]) -> dict[str, Any]:
        return {"start_step": 4, "start_layer": 10}

    def __post_init__(self) -> None:
        count = self.layer_count
        if not is_count(count) or count < 1:
            raise ValueError(f"masactrl: layer_count must be a whole number >= 1, got {count!r}")
        for option, value, most in (
            ("start_step", self.start_step, REFERENCE_STEPS),
            ("start_layer", self.start_layer, count),
        ):
            if not is_count(value) or value > most:
                raise ValueError(f"masactrl: {option} must be a whole number from 0 to {most}, got {value!r}")


class MasaCtrlEditor(Editor):
    """MasaCtrl over a batch: per step and layer, one gather of the keys and values of both halves.

    Args:
        rows (`EditRows`): the batch's rows; every job's settings a `MasaCtrl`.
    """

    edits_inputs = True
    settings_type = MasaCtrl

    def __init__(self, rows: EditRows) -> None:
        super().__init__(rows)
        self.step = 0
        self.layers: dict[str, int] = {}

    def sample(self, inputs: SamplingInputs) -> torch.Tensor:
        names = self_attention_layers(inputs.unet)
        self.layers = {name: k for k, name in enumerate(names)}
        steps = inputs.schedule.num_inference_steps
        # Per job: (source row, first target row, end row, first step, first layer) in this run's terms.
        self.windows = [
            (start, start + 1, end, by_share(s.start_step, REFERENCE_STEPS, steps),
             by_share(s.start_layer, s.layer_count, len(names)))
            for s, (start, end) in zip(self.rows.settings, self.rows.spans)
            if s is not None
        ]
        self._index: dict[tuple[int, int], Optional[torch.Tensor]] = {}
        self.step = 0
        return super().sample(inputs)

    def _sources(self, layer: int, device: torch.device) -> Optional[torch.Tensor]:
        """`[2 * rows]` the row each row of both halves reads keys and values from at this step
        and `layer`, None when no row is controlled."""
        cached = (self.step, layer)
        if cached not in self._index:
            rows = self.rows.rows
            index = torch.arange(rows)
            controlled = False
            for source, first, end, start_step, start_layer in self.windows:
                if self.step >= start_step and layer >= start_layer and end > first:
                    index[first:end] = source
                    controlled = True
            both = torch.cat([index, index + rows]).to(device) if controlled else None
            self._index = {cached: both}  # one step's layers at a time
        return self._index[cached]

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, layer: AttentionLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer.is_cross or layer.name not in self.layers:
            return query, key, value
        sources = self._sources(self.layers[layer.name], key.device)
        if sources is None:
            return query, key, value
        # Row b * heads + h: gather whole rows of both halves, every head with them.
        shape = (-1, heads, *key.shape[1:])
        key = key.reshape(shape).index_select(0, sources).reshape(key.shape)
        value = value.reshape(shape).index_select(0, sources).reshape(value.shape)
        return query, key, value

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """Records each job's conditional maps in its store (the cross-attention pictures)."""
        if any(store is not None for store in self.rows.stores):
            for store, part in zip(self.rows.stores, probs.split(list(self.rows.sizes))):
                if store is not None:
                    store.record(part, layer)
        return probs

    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        def on_step(step: int, timestep: int, latents: torch.Tensor) -> None:
            for store in self.rows.stores:
                if store is not None:
                    store.end_step()
            self.step = step + 1

        return then(on_step, after) or on_step
