"""`BatchedControl`: the Prompt-to-Prompt control of many edits sampled together, as operations
on the whole batch instead of one controller call per edit, layer and step.

`edit_jobs_latents` puts many edits' prompts in each UNet call. Handing every edit's controller
its own slice of each attention map costs a Python call and a handful of small kernels per edit,
per layer, per step (the bench's 24 edits at T = 50 on the `shapes` model: 9600 controller calls,
about 2 s of an 11 s batch on a CPU) and a copy of every map to put the slices back together.
Here every built-in controller (`Replace`, `Refine`, `Reweight`, with or without `LocalBlend`) is
turned into tensors over the batch's rows once, before sampling:

* cross-attention: each controller's `CrossForm` (its `replace_cross` as a token mapper, the
  tokens that take the mapped maps, and per-token factors) and its per-step, per-token window
  `alpha`, stacked over all edit rows: a gather of columns (a `[K, K]` product for rows whose
  words split into several tokens) and two `lerp`s per layer;
* self-attention: per step and layer size, which edit rows take their source's maps: one gather;
* the attention store: one store over all rows, split into each edit's own store when sampling
  ends (what the cross-attention pictures read);
* LocalBlend: every edit's blend words as a `[rows, K]` weight, its threshold per row, and its
  start step: one mask computation per step for the whole batch.

Each edit's latents equal those of its controller run alone up to the float rounding of a larger
batch (tests/test_editing_batch.py). Controllers of other classes (a user's subclass with its own
`replace_cross`, `__call__` or `end_step`), other blends or other stores fall back to the
per-edit calls of `edit._SplitHook`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nti_lightning.editing.attention import AttentionLayer, AttentionStore
from nti_lightning.editing.blend import BLEND_PLACES, LocalBlend, words_region
from nti_lightning.editing.controllers import (
    AttentionController,
    ConversionCache,
    CrossForm,
    converted_once,
    cross_form_of,
)
from nti_lightning.inversion.sampling import StepCallback


class BatchedControl:
    """Attention hook and step hook of a batch of edits, each edit's controller (or attention
    store, or neither) on its own rows. Build it with `BatchedControl.of`, after each controller's
    `begin`.

    Args:
        controllers (`Sequence[AttentionController | None]`): each edit's controller, begun.
        stores (`Sequence[AttentionStore | None]`): each edit's attention store (the controller's
            own where it has one), reset.
        forms (`Sequence[CrossForm | None]`): each controller's cross form.
        sizes (`Sequence[int]`): each edit's number of prompts (rows), in batch order.
        num_steps (`int`): T.
    """

    def __init__(
        self,
        controllers: Sequence[Optional[AttentionController]],
        stores: Sequence[Optional[AttentionStore]],
        forms: Sequence[Optional[CrossForm]],
        sizes: Sequence[int],
        num_steps: int,
    ) -> None:
        self.controllers, self.stores, self.sizes = list(controllers), list(stores), list(sizes)
        self.num_steps, self.step, self.rows = num_steps, 0, sum(self.sizes)
        starts = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.spans = [(start, start + size) for start, size in zip(starts, self.sizes)]
        kept = [store for store in self.stores if store is not None]
        self.store = AttentionStore(max(store.max_queries for store in kept), keep_self=any(store.keep_self for store in kept))

        # Every row's source row (a row of an edit without controller is its own source).
        self.source_row = torch.arange(self.rows)
        edit_rows, mappers, aligned, factors, alphas = [], [], [], [], []
        self.self_windows: list[tuple[int, int, int, int, int]] = []  # (first row, last row + 1, start, end, max queries)
        for controller, form, (start, end) in zip(self.controllers, forms, self.spans):
            if controller is None:
                continue
            self.source_row[start + 1 : end] = start
            edit_rows.append(torch.arange(start + 1, end))
            mappers.append(form.mapper)
            aligned.append(form.aligned)
            factors.append(form.factors)
            alphas.append(controller.cross_alpha)  # [T, P-1, K]
            self.self_windows.append((start + 1, end, *controller.self_steps, controller.self_replace_max_queries))
        self.edit_rows = torch.cat(edit_rows)
        self.edit_sources = self.source_row[self.edit_rows]
        self.mapper, self.aligned, self.factors = torch.cat(mappers), torch.cat(aligned), torch.cat(factors)
        self.alpha = torch.cat(alphas, dim=1)  # [T, E, K]
        # Rows whose mapper picks exactly one source token (weight 1) per edit token, and which.
        picks = ((self.mapper == 0) | (self.mapper == 1)).all(dim=(1, 2)) & (self.mapper.sum(dim=1) == 1).all(dim=1)
        self.select_index = self.mapper.argmax(dim=1)  # [E, K] source token of each edit token
        self.general_rows = torch.nonzero(~picks).flatten()
        self.general_mapper = self.mapper[self.general_rows]  # [G, K, K] the others' products
        self.cross_steps = self.alpha.flatten(1).any(dim=1).tolist()  # steps where some edit row is replaced
        self._blend_setup()
        self._on_device: ConversionCache = {}
        self._self_rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def of(
        controllers: Sequence[Optional[AttentionController]],
        stores: Sequence[Optional[AttentionStore]],
        sizes: Sequence[int],
        num_steps: int,
    ) -> Optional["BatchedControl"]:
        """The batched control of these edits, or None when one of them needs its own calls (a
        controller, blend or store of a class other than the built-in ones) or none has a controller."""
        forms = []
        for controller, store in zip(controllers, stores):
            if store is not None and type(store) is not AttentionStore:
                return None
            if controller is None:
                forms.append(None)
                continue
            kind = type(controller)
            if kind.__call__ is not AttentionController.__call__ or kind.end_step is not AttentionController.end_step:
                return None
            if controller.local_blend is not None and type(controller.local_blend) is not LocalBlend:
                return None
            form = cross_form_of(controller)
            if form is None:
                return None
            forms.append(form)
        if all(controller is None for controller in controllers):
            return None
        return BatchedControl(controllers, stores, forms, sizes, num_steps)

    # ----------------------------------------------------------------------------------------
    # The attention hook: `[rows, heads, queries, keys]` conditional maps of one layer.

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        if probs.shape[0] != self.rows:
            raise RuntimeError(f"batched control built for {self.rows} rows got a batch of {probs.shape[0]}")
        if self.step >= self.num_steps:
            raise RuntimeError(f"step {self.step} past the {self.num_steps} steps of the run")
        if layer.is_cross:
            if self.cross_steps[self.step]:  # past every edit's window the maps are the UNet's own
                rows, sources = self.tensor("edit_rows", self.edit_rows, probs), self.tensor("edit_sources", self.edit_sources, probs)
                base, edits = probs.index_select(0, sources), probs.index_select(0, rows)
                # The controllers' arithmetic per row: `replace_cross`, then the step's window.
                # `aligned` and `alpha` are 0 or 1, where `lerp` gives exactly the controllers'
                # `a * x + (1 - a) * y` (its weight-1 branch is `end - (end - start) * 0`), in
                # three passes over the maps instead of seven.
                mapped = self.mapped(base)
                aligned = self.tensor("aligned", self.aligned, probs)[:, None, None, :]
                replaced = torch.lerp(edits, mapped, aligned) * self.tensor("factors", self.factors, probs)[:, None, None, :]
                alpha = self.tensor("alpha", self.alpha, probs)[self.step][:, None, None, :]
                probs = _put_rows(probs, rows, torch.lerp(edits, replaced, alpha))
        else:
            rows, sources = self.self_replaced_rows(probs.shape[2], probs.device)
            if rows.numel():
                probs = _put_rows(probs, rows, probs.index_select(0, sources))
        self.store.record(probs, layer)
        return probs

    def mapped(self, base: torch.Tensor) -> torch.Tensor:
        """`einsum("ehqw,ewn->ehqn", base, mapper)`: the source maps mapped to each edit's tokens.

        Most mappers pick one source token per edit token (Refine's always; Replace's unless a
        word is split into several tokens): for those rows the product is a gather of columns,
        exact and far cheaper than the `[K, K]` product (which the other rows get)."""
        index = self.tensor("select_index", self.select_index, base)[:, None, None, :].expand_as(base)
        mapped = base.gather(3, index)
        if self.general_rows.numel():
            rows = self.tensor("general_rows", self.general_rows, base)
            mapper = self.tensor("general_mapper", self.general_mapper, base)
            mapped.index_copy_(0, rows, torch.einsum("ehqw,ewn->ehqn", base.index_select(0, rows), mapper))
        return mapped

    def self_replaced_rows(self, queries: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(edit rows, their source rows) that take the source's self-attention at this step in a
        layer of `queries` positions: each controller's `self_steps` and `self_replace_max_queries`."""
        key = (self.step, queries)
        if key not in self._self_rows:
            rows = [
                row
                for first, last, start, end, max_queries in self.self_windows
                if start <= self.step < end and queries <= max_queries
                for row in range(first, last)
            ]
            index = torch.tensor(rows, dtype=torch.long)
            self._self_rows[key] = (index.to(device), self.source_row[index].to(device))
        return self._self_rows[key]

    # ----------------------------------------------------------------------------------------
    # The step hook: after each sampling step, LocalBlend (the controllers' `end_step`).

    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        """The sampler's `on_step`: the controllers' end of step (LocalBlend), then `after` (Direct
        Inversion's offsets: `InversionMethod.source_hook`), in the order of a controller run alone."""

        def on_step(step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
            self.store.end_step()
            latents = self.blend(latents, step)
            self.step = step + 1
            replaced = after(step, timestep, latents) if after is not None else None
            return latents if replaced is None else replaced

        return on_step

    def _blend_setup(self) -> None:
        """Each row's blend words, threshold and group (its blend's start step and map resolution)."""
        tokens = self.alpha.shape[-1]
        self.blend_weights = torch.zeros(self.rows, tokens)
        self.blend_thresholds = torch.zeros(self.rows)
        self.blends: list[tuple[int, Optional[int], int, int, int]] = []  # (start step, resolution, max queries, rows)
        for controller, store, (start, end) in zip(self.controllers, self.stores, self.spans):
            blend = controller.local_blend if controller is not None else None
            if blend is None:
                continue
            self.blend_weights[start:end] = blend.weights
            self.blend_thresholds[start:end] = blend.threshold
            self.blends.append((blend.start_step(self.num_steps), blend.resolution, store.max_queries, start, end))

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """Latents after step `step` with every blended edit kept at its source outside its mask
        (`LocalBlend.__call__` for all rows at once)."""
        active = [(resolution, max_queries, start, end) for first, resolution, max_queries, start, end in self.blends if step >= first]
        if not active:
            return latents
        resolutions: dict[int, list[tuple[int, int]]] = {}
        for resolution, max_queries, start, end in active:
            if resolution is None:  # the coarsest down/up maps this edit's own store keeps
                kept = [side for side in self.store.resolutions(BLEND_PLACES) if side * side <= max_queries]
                if not kept:
                    raise ValueError("LocalBlend found no down/up cross-attention maps in the store")
                resolution = kept[0]
            resolutions.setdefault(resolution, []).append((start, end))
        source = self.tensor("source_row", self.source_row, latents)
        for resolution, spans in resolutions.items():
            maps = self.store.maps(resolution, BLEND_PLACES, is_cross=True, average=False)  # [rows, r, r, K]
            weights, thresholds = self.tensor("blend_weights", self.blend_weights, maps), self.tensor("blend_thresholds", self.blend_thresholds, maps)
            mask = words_region(maps, weights, thresholds, latents.shape[2:])
            mask = (mask.index_select(0, source) | mask).to(latents.dtype)
            sources = latents.index_select(0, source)
            blended = sources + mask * (latents - sources)
            rows = torch.zeros(self.rows, dtype=torch.bool)
            for start, end in spans:
                rows[start:end] = True
            latents = torch.where(rows.to(latents.device)[:, None, None, None], blended, latents)
        return latents

    # ----------------------------------------------------------------------------------------

    def finish(self) -> None:
        """After sampling: each edit's store gets its rows of the maps (what a controller run
        alone would have recorded), and each controller is left at the end of the run."""
        for store, (start, end) in zip(self.stores, self.spans):
            if store is None:
                continue
            store.reset()
            for layer, total in self.store.sums.items():
                if total.shape[1] <= store.max_queries and (layer.is_cross or store.keep_self):
                    store.sums[layer] = total[start:end].clone()
                    store.heads[layer] = self.store.heads[layer]
            store.num_steps = self.store.num_steps
        for controller in self.controllers:
            if controller is not None:
                controller.step = self.step

    def tensor(self, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`tensor` on `like`'s device (and dtype, unless it holds indices), converted once per run."""
        return converted_once(self._on_device, name, tensor, like)


def _put_rows(probs: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`probs` with `rows` replaced by `values`: in place when nothing tracks gradients (sampling
    an edit), which saves the copy of every map a new tensor costs."""
    values = values.to(probs.dtype)
    if torch.is_grad_enabled() and (probs.requires_grad or values.requires_grad):
        return probs.index_copy(0, rows, values)
    return probs.index_copy_(0, rows, values)
