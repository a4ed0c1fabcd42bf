"""`BatchedControl`: Prompt-to-Prompt's control, the one place its maths runs, for one edit or many.

The controllers (`Replace`, `Refine`, `Reweight`, with or without `LocalBlend`:
`nti_lightning.editing.controllers`) describe an edit: before sampling, each turns its settings
into tensors over its rows (`JobControl`). `BatchedControl` does the edits of a whole batch, as
operations on all its rows at once instead of one controller call per edit, layer and step (the
bench's 24 edits at T = 50 on the `shapes` model: 9600 controller calls, about 2 s of an 11 s
batch on a CPU, and a copy of every map to put the slices back together):

* cross-attention: each job's `CrossForm` (its `replace_cross` as a token mapper, the tokens that
  take the mapped maps, and per-token factors) and its per-step, per-token window `alpha`, stacked
  over all edit rows (`StackedForms`): a gather of columns (a `[K, K]` product for rows whose
  words split into several tokens) and two `lerp`s per layer;
* self-attention: per step and layer size, which edit rows take their source's maps: one gather;
* the attention store: one store over all rows, split into each job's own store when sampling
  ends (what the cross-attention pictures read); a job alone records into its own store;
* LocalBlend: every job's blend words as a `[rows, K]` weight, its threshold per row, and its
  start step: one mask computation per step for the whole batch (`nti_lightning.editing.blend`).

`edit_jobs_latents` runs every batch whose controllers are built-in through `BatchedControl.of`,
a single edit included; each job's latents equal those of its edit alone up to the float rounding
of a larger batch (tests/test_editing_batch.py). A controller called on its own (its `__call__`
and `end_step`, which a user's subclass may extend and which `edit._SplitHook` calls for a batch
holding such a controller) runs a `BatchedControl` of its own rows too; there a `replace_cross`
without a form (a user's own) is called on the job's rows, and a blend of another class than
`LocalBlend` is called with the job's store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from nti_lightning.editing.attention import AttentionLayer, AttentionStore
from nti_lightning.editing.blend import (
    BLEND_PLACES,
    LocalBlend,
    blend_mask,
    blend_resolution,
    keep_source_outside,
)
from nti_lightning.editing.editor import Editor, EditRows, then
from nti_lightning.inversion.sampling import StepCallback

#: A controller's own `replace_cross(source [heads, q, K], edits [P-1, heads, q, K])`.
ReplaceCross = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CrossForm:
    """A controller's `replace_cross` as tensors, so that many controllers run as one batched
    operation (`StackedForms`). Edit prompt p's maps become

        `(einsum("hqw,wn->hqn", source, mapper[p]) * aligned[p] + edit * (1 - aligned[p])) * factors[p]`

    Args:
        mapper (`torch.Tensor`): `[P-1, K, K]` source token w -> edit token n weights.
        aligned (`torch.Tensor`): `[P-1, K]` 1 where the edit token takes the mapped source map,
            0 where it keeps its own (Refine's inserted words).
        factors (`torch.Tensor`): `[P-1, K]` scale of each edit token's map (Reweight).
    """

    mapper: torch.Tensor
    aligned: torch.Tensor
    factors: torch.Tensor

    @staticmethod
    def identity(edits: int, tokens: int) -> "CrossForm":
        """Every edit prompt takes the source's maps token for token.

        Args:
            edits (`int`): P-1, the number of edit prompts.
            tokens (`int`): K, the text encoder's window.
        """
        ones = torch.ones(edits, tokens)
        return CrossForm(torch.eye(tokens).expand(edits, -1, -1).clone(), ones, ones.clone())


#: Tensors already converted for a run, by (name, device, dtype).
ConversionCache = dict[tuple[str, torch.device, torch.dtype], torch.Tensor]


def converted_once(cache: ConversionCache, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` on `like`'s device (and dtype, unless it holds indices), kept in `cache` under
    `name`: a control's constants are converted once per run, not once per layer and step.

    Args:
        cache (`ConversionCache`): the conversions made so far.
        name (`str`): the tensor's key in `cache`.
        tensor (`torch.Tensor`): the tensor, on the host.
        like (`torch.Tensor`): a tensor of the device and float dtype wanted.
    """
    dtype = tensor.dtype if not tensor.is_floating_point() else like.dtype
    key = (name, like.device, dtype)
    if key not in cache:
        cache[key] = tensor.to(device=like.device, dtype=dtype)
    return cache[key]


@dataclass(frozen=True)
class JobControl:
    """One job's Prompt-to-Prompt control as tensors over its rows, for the run its controller's
    `begin` prepared: what the controller's settings say (`AttentionController.job_control`).

    Args:
        cross_alpha (`torch.Tensor`): `[T, P-1, K]` 1 where edit prompt p's token k takes the
            replaced map at step i (the cross-attention windows), 0 elsewhere.
        self_steps (`tuple[int, int]`): steps `start <= i < end` at which the edit rows take the
            source's self-attention.
        self_max_queries (`int`): self-attention is replaced in layers with at most this many queries.
        form (`CrossForm`, *optional*): the edit rows' `replace_cross` as tensors; exactly one of
            `form` and `replace_cross` is given.
        replace_cross (`ReplaceCross`, *optional*): a controller's own `replace_cross` (a user's
            kind, which has no form), called on the job's rows.
        blend (`LocalBlend`, *optional*): keeps the source outside the edited words' region; a blend
            of another class is called with the job's own store (a job alone only).
    """

    cross_alpha: torch.Tensor
    self_steps: tuple[int, int]
    self_max_queries: int
    form: Optional[CrossForm] = None
    replace_cross: Optional[ReplaceCross] = None
    blend: Optional[LocalBlend] = None

    def __post_init__(self) -> None:
        if (self.form is None) == (self.replace_cross is None):
            raise ValueError("a job's control takes either its cross form or its own replace_cross")


@runtime_checkable
class PromptToPromptSettings(Protocol):
    """A job's settings that `BatchedControl.of` edits: a Prompt-to-Prompt controller, begun."""

    def job_control(self) -> Optional[JobControl]:
        """Its control as tensors, or None when it needs calls of its own (a user's subclass)."""
        ...


class StackedForms:
    """The `CrossForm`s of many edit rows, stacked: their `replace_cross` as one operation.

    Args:
        forms (`Sequence[CrossForm]`): the forms, in the order of their edit rows.
    """

    def __init__(self, forms: Sequence[CrossForm]) -> None:
        self.mapper = torch.cat([form.mapper for form in forms])  # [E, K, K]
        self.aligned = torch.cat([form.aligned for form in forms])  # [E, K]
        self.factors = torch.cat([form.factors for form in forms])  # [E, K]
        # Rows whose mapper picks exactly one source token (weight 1) per edit token, and which.
        mapper = self.mapper
        picks = ((mapper == 0) | (mapper == 1)).all(dim=(1, 2)) & (mapper.sum(dim=1) == 1).all(dim=1)
        self.select_index = mapper.argmax(dim=1)  # [E, K] source token of each edit token
        self.general_rows = torch.nonzero(~picks).flatten()
        self.general_mapper = mapper[self.general_rows]  # [G, K, K] the others' products
        self._on_device: ConversionCache = {}

    def replaced(self, sources: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """`[E, heads, queries, K]`: each edit row's maps by its form,
        `(einsum(source, mapper) * aligned + edit * (1 - aligned)) * factors`.

        Args:
            sources (`torch.Tensor`): `[E, heads, queries, K]` each edit row's source maps.
            edits (`torch.Tensor`): `[E, heads, queries, K]` the edit rows' own maps.
        """
        # `aligned` is 0 or 1, where `lerp` gives exactly `a * x + (1 - a) * y` (its weight-1
        # branch is `end - (end - start) * 0`) in one pass over the maps instead of four.
        aligned = self.tensor("aligned", self.aligned, sources)[:, None, None, :]
        factors = self.tensor("factors", self.factors, sources)[:, None, None, :]
        return torch.lerp(edits, self.mapped(sources), aligned) * factors

    def mapped(self, sources: torch.Tensor) -> torch.Tensor:
        """`einsum("ehqw,ewn->ehqn", sources, mapper)`: the source maps mapped to each edit's tokens.

        Most mappers pick one source token per edit token (Refine's always; Replace's unless a
        word is split into several tokens): for those rows the product is a gather of columns,
        exact and far cheaper than the `[K, K]` product (which the other rows get).

        Args:
            sources (`torch.Tensor`): `[E, heads, queries, K]` each edit row's source maps.
        """
        index = self.tensor("select_index", self.select_index, sources)[:, None, None, :].expand_as(sources)
        mapped = sources.gather(3, index)
        if self.general_rows.numel():
            rows = self.tensor("general_rows", self.general_rows, sources)
            mapper = self.tensor("general_mapper", self.general_mapper, sources)
            mapped.index_copy_(0, rows, torch.einsum("ehqw,ewn->ehqn", sources.index_select(0, rows), mapper))
        return mapped

    def tensor(self, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`tensor` on `like`'s device (and dtype, unless it holds indices), converted once."""
        return converted_once(self._on_device, name, tensor, like)


class BatchedControl(Editor):
    """Prompt-to-Prompt over a batch: the attention hook and step hook of every job's control at
    once, each job on its own rows; rows of jobs without control pass untouched (their store, if
    any, records them). Build it with `BatchedControl.of` for jobs of built-in controllers.

    Args:
        rows (`EditRows`): the batch's rows, with each job's settings and store (reset).
        controls (`Sequence[JobControl | None]`): each job's control, None for a job without settings.

    Raises:
        `ValueError` when the controls do not fit the rows.
    """

    def __init__(self, rows: EditRows, controls: Sequence[Optional[JobControl]]) -> None:
        self.controls = list(controls)
        if len(self.controls) != len(rows.sizes):
            raise ValueError(f"BatchedControl got {len(self.controls)} controls for {len(rows.sizes)} jobs")
        if any((control is None) != (settings is None) for control, settings in zip(self.controls, rows.settings)):
            raise ValueError("BatchedControl needs a control for every job with settings, and none for the others")
        if all(control is None for control in self.controls):
            raise ValueError("BatchedControl needs at least one job with a control")
        self.stores, self.spans, self.rows = list(rows.stores), rows.spans, rows.rows
        self.num_steps, self.step = rows.num_steps, 0
        # A job alone records into its own store as it goes; many record into one store over all
        # rows, split into their own stores by `finish`.
        self.shared_store = len(self.stores) > 1 or self.stores[0] is None
        kept = [store for store in self.stores if store is not None]
        if not self.shared_store:
            self.store = kept[0]
        elif kept:
            self.store = AttentionStore(max(s.max_queries for s in kept), keep_self=any(s.keep_self for s in kept))
        else:
            self.store = AttentionStore()

        self.source_row = rows.source_row()  # a row of a job without control is its own source
        self.edit_rows = rows.target_rows()
        self.edit_sources = self.source_row[self.edit_rows]
        jobs = [(control, span) for control, span in zip(self.controls, self.spans) if control is not None]
        for control, (start, end) in jobs:
            if control.cross_alpha.shape[:2] != (self.num_steps, end - start - 1):
                raise ValueError(
                    f"a control's cross_alpha {tuple(control.cross_alpha.shape)} is not [T={self.num_steps}, "
                    f"{end - start - 1} edit prompts, K]: begin() it for this run"
                )
        self.alpha = torch.cat([control.cross_alpha for control, _ in jobs], dim=1)  # [T, E, K]
        self.cross_steps = self.alpha.flatten(1).any(dim=1).tolist()  # steps where some edit row is replaced
        self._cross_setup(jobs)
        # (first row, last row + 1, start step, end step, max queries) of every job's self-attention window
        self.self_windows = [(start + 1, end, *c.self_steps, c.self_max_queries) for c, (start, end) in jobs]
        self._blend_setup()
        self._on_device: ConversionCache = {}
        self._self_rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, rows: EditRows) -> Optional["BatchedControl"]:
        """The batched control of these jobs, or None when one of them needs calls of its own (a
        controller, blend or store of a class other than the built-in ones) or none has a controller.

        Args:
            rows (`EditRows`): the batch's rows; each job's settings a controller (begun) or None.
        """
        controls: list[Optional[JobControl]] = []
        for settings, store in zip(rows.settings, rows.stores):
            if store is not None and type(store) is not AttentionStore:
                return None  # a store of its own class records in its own way: its own calls
            if settings is None:
                controls.append(None)
                continue
            if not isinstance(settings, PromptToPromptSettings):
                return None  # another editor's settings
            control = settings.job_control()
            if control is None:
                return None
            controls.append(control)
        if all(control is None for control in controls):
            return None
        return cls(rows, controls)

    # ----------------------------------------------------------------------------------------
    # The attention hook: `[rows, heads, queries, keys]` conditional maps of one layer.

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """Edits `[rows, heads, queries, keys]` conditional maps of one layer at the current step
        (in place when nothing tracks gradients) and records them.

        Args:
            probs (`torch.Tensor`): the maps of every row of the batch.
            layer (`AttentionLayer`): where the call happens.
        """
        if probs.shape[0] != self.rows:
            raise RuntimeError(f"attention control built for {self.rows} prompts got a batch of {probs.shape[0]}")
        if self.step >= self.num_steps:
            raise RuntimeError(f"step {self.step} past the {self.num_steps} steps of the run")
        if layer.is_cross:
            if self.cross_steps[self.step]:  # past every edit's window the maps are the UNet's own
                rows = self.tensor("edit_rows", self.edit_rows, probs)
                edits = probs.index_select(0, rows)
                alpha = self.tensor("alpha", self.alpha, probs)[self.step][:, None, None, :]
                # `alpha` is 0 or 1: `lerp` gives exactly `alpha * replaced + (1 - alpha) * edits`.
                probs = _put_rows(probs, rows, torch.lerp(edits, self.replaced_cross(probs, edits), alpha))
        else:
            rows, sources = self.self_replaced_rows(probs.shape[2], probs.device)
            if rows.numel():
                probs = _put_rows(probs, rows, probs.index_select(0, sources))
        self.store.record(probs, layer)
        return probs

    def _cross_setup(self, jobs: Sequence[tuple[JobControl, tuple[int, int]]]) -> None:
        """The jobs' forms stacked, and where a job's own `replace_cross` fills its rows instead."""
        formed = [(control, span) for control, span in jobs if control.form is not None]
        self.forms = StackedForms([control.form for control, _ in formed]) if formed else None
        self.own_cross = len(formed) < len(jobs)
        if not self.own_cross:
            return
        # (own replace_cross or None, first row, last row + 1, first and last + 1 of its rows among the formed ones)
        self.cross_parts: list[tuple[Optional[ReplaceCross], int, int, int, int]] = []
        formed_rows: list[int] = []
        for control, (start, end) in jobs:
            first = len(formed_rows)
            if control.form is not None:
                formed_rows.extend(range(start + 1, end))
            self.cross_parts.append((control.replace_cross, start, end, first, len(formed_rows)))
        self.form_rows = torch.tensor(formed_rows, dtype=torch.long)
        self.form_sources = self.source_row[self.form_rows]

    def replaced_cross(self, probs: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """`[E, heads, queries, K]` maps each edit row takes inside its window: its job's `replace_cross`.

        Args:
            probs (`torch.Tensor`): `[rows, heads, queries, K]` the batch's cross-attention maps.
            edits (`torch.Tensor`): `[E, heads, queries, K]` the edit rows' own maps.
        """
        if not self.own_cross:  # every job has a form: one operation over all edit rows
            assert self.forms is not None
            sources = probs.index_select(0, self.tensor("edit_sources", self.edit_sources, probs))
            return self.forms.replaced(sources, edits)
        formed = None
        if self.forms is not None:
            sources = probs.index_select(0, self.tensor("form_sources", self.form_sources, probs))
            rows = self.tensor("form_rows", self.form_rows, probs)
            formed = self.forms.replaced(sources, probs.index_select(0, rows))
        parts = []
        for replace_cross, start, end, first, last in self.cross_parts:
            if replace_cross is None:
                parts.append(formed[first:last])
            else:  # a controller of the user's own kind: its replace_cross on its rows
                parts.append(replace_cross(probs[start], probs[start + 1 : end]).to(edits.dtype))
        return torch.cat(parts)

    def self_replaced_rows(self, queries: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(edit rows, their source rows) that take the source's self-attention at this step in a
        layer of `queries` positions: each job's `self_steps` and `self_max_queries`.

        Args:
            queries (`int`): the layer's number of query positions.
            device (`torch.device`): where the maps are.
        """
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

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """After sampling step `step`: the store's step, LocalBlend, then on to the next step.

        Args:
            step (`int`): the step just taken (0-based).
            latents (`torch.Tensor`): `[rows, C, h, w]` latents after it.
        """
        self.store.end_step()
        latents = self.blend(latents, step)
        self.step = step + 1
        return latents

    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        """The sampler's `on_step`: the controls' end of step (LocalBlend), then `after` (Direct
        Inversion's offsets: `InversionMethod.source_hook`), in the order of a controller run alone.

        Args:
            after (`StepCallback`, *optional*): run next on the blended latents.
        """

        def on_step(step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
            return self.end_step(step, latents)

        return then(on_step, after) or on_step

    def _blend_setup(self) -> None:
        """Each row's blend words, threshold and group (its blend's start step and map resolution)."""
        tokens = self.alpha.shape[-1]
        self.blend_weights = torch.zeros(self.rows, tokens)
        self.blend_thresholds = torch.zeros(self.rows)
        self.blends: list[tuple[int, Optional[int], int, int, int]] = []  # (start step, resolution, max queries, rows)
        self.own_blends: list[LocalBlend] = []
        for control, store, (start, end) in zip(self.controls, self.stores, self.spans):
            blend = control.blend if control is not None else None
            if blend is None:
                continue
            if type(blend) is not LocalBlend:
                # A blend of its own class reads its job's own store: only a job alone has one as it goes.
                if self.shared_store:
                    raise ValueError(
                        f"a blend of class {type(blend).__name__} runs only in a BatchedControl of its job alone"
                    )
                self.own_blends.append(blend)
                continue
            self.blend_weights[start:end] = blend.weights
            self.blend_thresholds[start:end] = blend.threshold
            max_queries = (store if store is not None else self.store).max_queries
            self.blends.append((blend.start_step(self.num_steps), blend.resolution, max_queries, start, end))

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """Latents after step `step` with every blended job kept at its source outside its mask
        (`LocalBlend.__call__` for all rows at once).

        Args:
            latents (`torch.Tensor`): `[rows, C, h, w]` latents after the step.
            step (`int`): the step just taken.
        """
        active = [(resolution, queries, start, end) for first, resolution, queries, start, end in self.blends
                  if step >= first]
        if active:
            resolutions: dict[int, list[tuple[int, int]]] = {}
            for resolution, max_queries, start, end in active:
                # the coarsest down/up maps this job's own store keeps, unless the blend names one
                side = blend_resolution(self.store, resolution, max_queries)
                resolutions.setdefault(side, []).append((start, end))
            source = self.tensor("source_row", self.source_row, latents)
            for side, spans in resolutions.items():
                maps = self.store.maps(side, BLEND_PLACES, is_cross=True, average=False)  # [rows, r, r, K]
                weights = self.tensor("blend_weights", self.blend_weights, maps)
                thresholds = self.tensor("blend_thresholds", self.blend_thresholds, maps)
                mask = blend_mask(maps, weights, thresholds, latents.shape[2:], source.to(maps.device))
                blended = keep_source_outside(latents, mask, source)
                rows = torch.zeros(self.rows, dtype=torch.bool)
                for start, end in spans:
                    rows[start:end] = True
                latents = torch.where(rows.to(latents.device)[:, None, None, None], blended, latents)
        for blend in self.own_blends:  # a job alone: its rows are the batch's, its store ours
            latents = blend(latents, self.store, step, self.num_steps)
        return latents

    # ----------------------------------------------------------------------------------------

    def finish(self) -> None:
        """After sampling: each job's store gets its rows of the maps (what its controller run
        alone would have recorded); a job alone recorded into its own already."""
        if not self.shared_store:
            return
        for store, (start, end) in zip(self.stores, self.spans):
            if store is None:
                continue
            store.reset()
            for layer, total in self.store.sums.items():
                if total.shape[1] <= store.max_queries and (layer.is_cross or store.keep_self):
                    store.sums[layer] = total[start:end].clone()
                    store.heads[layer] = self.store.heads[layer]
            store.num_steps = self.store.num_steps

    def tensor(self, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`tensor` on `like`'s device (and dtype, unless it holds indices), converted once per run.

        Args:
            name (`str`): the tensor's key.
            tensor (`torch.Tensor`): the tensor, on the host.
            like (`torch.Tensor`): a tensor of the device and float dtype wanted.
        """
        return converted_once(self._on_device, name, tensor, like)


def _put_rows(probs: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`probs` with `rows` replaced by `values`: in place when nothing tracks gradients (sampling
    an edit), which saves the copy of every map a new tensor costs."""
    values = values.to(probs.dtype)
    if torch.is_grad_enabled() and (probs.requires_grad or values.requires_grad):
        return probs.index_copy(0, rows, values)
    return probs.index_copy_(0, rows, values)
