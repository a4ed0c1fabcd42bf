"""Editors: the one object that edits a batch of edits' rows.

`edit_jobs_latents` samples many edits (jobs) together: each job is one inversion's prompts, one row
of the batch per prompt; a job with edit settings (a Prompt-to-Prompt controller) has its source
prompt's row first and its target rows after it. An editor sees the whole batch at once, as
`EditRows` (the rows, which are whose source and targets, each job's settings and attention
store), and gives the two hooks the sampler calls:

* the attention hook (`Editor.__call__`): every attention layer's conditional maps
  `[rows, heads, queries, keys]` at the current step, returned edited;
* the step hook (`Editor.step_hook`): the latents after each sampling step, returned changed or not,
  followed by the inversions' own source-branch hook (Direct Inversion's offsets).

Prompt-to-Prompt (`nti_lightning.editing.batched_control.BatchedControl`) is the first editor.
`nti_lightning.editing.edit.EDITORS` lists the editors in the order a batch is offered to them:
a new one (an attention processor that sees the batch's source and target rows and per-row
settings, such as MasaCtrl or Plug-and-Play) is one module with an `Editor` subclass whose `of`
takes the batches whose jobs carry its settings, added to that list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from nti_lightning.editing.attention import AttentionLayer, AttentionStore
from nti_lightning.inversion.sampling import StepCallback


@dataclass(frozen=True)
class EditRows:
    """The rows of a batch of edits, as an editor sees them: jobs one after the other, each job's
    rows its prompts in order.

    Args:
        sizes (`Sequence[int]`): each job's number of prompts (rows), in batch order.
        settings (`Sequence[Any]`): each job's edit settings (for Prompt-to-Prompt its controller,
            begun), None for a job sampled without control. A job with settings has its source
            row first and its target rows after it.
        stores (`Sequence[AttentionStore | None]`): each job's attention store (reset), or None.
        num_steps (`int`): T, the number of sampling steps.
    """

    sizes: tuple[int, ...]
    settings: tuple[Any, ...]
    stores: tuple[Optional[AttentionStore], ...]
    num_steps: int

    def __post_init__(self) -> None:
        # Frozen, so that an editor may keep it: sequences become tuples.
        for name in ("sizes", "settings", "stores"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not len(self.sizes) == len(self.settings) == len(self.stores):
            raise ValueError(
                f"EditRows needs one size, settings and store per job, got {len(self.sizes)}, "
                f"{len(self.settings)} and {len(self.stores)}"
            )
        if any(size < 1 for size in self.sizes):
            raise ValueError(f"every job has at least one row, got sizes {list(self.sizes)}")

    @property
    def rows(self) -> int:
        """The number of rows of the batch."""
        return sum(self.sizes)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Each job's rows as `(first, last + 1)`."""
        starts = [sum(self.sizes[:job]) for job in range(len(self.sizes))]
        return [(start, start + size) for start, size in zip(starts, self.sizes)]

    def source_row(self) -> torch.Tensor:
        """`[rows]` long: every row's source row, the first row of its job for a job with settings
        (its own for that first row), itself for a row of a job without."""
        source = torch.arange(self.rows)
        for settings, (start, end) in zip(self.settings, self.spans):
            if settings is not None:
                source[start:end] = start
        return source

    def target_rows(self) -> torch.Tensor:
        """`[E]` long: the target rows of the jobs with settings (all their rows but the first), in order."""
        rows = [
            row
            for settings, (start, end) in zip(self.settings, self.spans)
            if settings is not None
            for row in range(start + 1, end)
        ]
        return torch.tensor(rows, dtype=torch.long)


class Editor(ABC):
    """What edits a batch: its attention hook and its step hook over all rows (see the module's
    documentation). Build one with `of`; the sampler then calls it at every attention layer and
    its `step_hook` after every step, and `finish` once sampling is over."""

    @classmethod
    @abstractmethod
    def of(cls, rows: EditRows) -> Optional["Editor"]:
        """This editor over `rows`, or None when it does not edit them (a job's settings are of
        another editor's kind, or need calls of their own).

        Args:
            rows (`EditRows`): the batch's rows, with each job's settings and store.
        """

    @abstractmethod
    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """The attention hook: `[rows, heads, queries, keys]` conditional maps of `layer` at the
        current step, edited (possibly in place when nothing tracks gradients).

        Args:
            probs (`torch.Tensor`): the maps, every row of the batch.
            layer (`AttentionLayer`): where the call happens.
        """

    @abstractmethod
    def step_hook(self, after: Optional[StepCallback] = None) -> StepCallback:
        """The sampler's `on_step` for the whole batch: this editor's end of step, then `after`.

        Args:
            after (`StepCallback`, *optional*): run next on the latents this editor returns (the
                inversions' source-branch hooks: Direct Inversion's offsets).
        """

    def finish(self) -> None:
        """After sampling: hands each job what was recorded for it (its attention store's maps)."""


def editor_for(rows: EditRows, editors: Sequence[type[Editor]]) -> Editor:
    """The first of `editors` that edits `rows`.

    Args:
        rows (`EditRows`): the batch's rows.
        editors (`Sequence[type[Editor]]`): the editors, in the order they are offered the batch.

    Raises:
        `ValueError` when none of them takes the batch (jobs of several editors' kinds in one batch).
    """
    for kind in editors:
        editor = kind.of(rows)
        if editor is not None:
            return editor
    kinds = sorted({type(settings).__name__ for settings in rows.settings if settings is not None})
    raise ValueError(f"no editor edits a batch of {kinds} together: sample each kind of edit in a batch of its own")


def then(first: Optional[StepCallback], after: Optional[StepCallback]) -> Optional[StepCallback]:
    """A step hook running `first`, then `after` on the latents `first` returned (a hook returning
    None leaves the latents as they were); None when both are.

    Args:
        first (`StepCallback`, *optional*): the editor's own end of step.
        after (`StepCallback`, *optional*): what runs next (the source-branch hooks).
    """
    if first is None or after is None:
        return first if after is None else after

    def on_step(step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        for hook in (first, after):
            replaced = hook(step, timestep, latents)
            latents = latents if replaced is None else replaced
        return latents

    return on_step
