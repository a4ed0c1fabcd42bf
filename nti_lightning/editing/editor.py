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

An editor that needs more than the two hooks says so: `edits_inputs` (it sees every attention
call's queries, keys and values: `attend`), `sees_all_rows` (its attention hook gets both halves
of classifier-free guidance) or its own `sample` (the sampling loop itself, from the batch's
`SamplingInputs`: Plug-and-Play's source branch, Pix2Pix-Zero's reference pass and gradient step).

Prompt-to-Prompt (`nti_lightning.editing.batched_control.BatchedControl`) is the first editor;
MasaCtrl (`masactrl`), Plug-and-Play (`plug_and_play`) and Pix2Pix-Zero (`pix2pix_zero`) each
have a settings class (an `EditorSettings`, what a job carries) and an `Editor` in a module of
their own. `nti_lightning.editing.edit.EDITORS` lists the editors in the order a batch is offered
to them and `nti_lightning.editing.editors.EDITOR_SETTINGS` the settings by name: a new editor is
one module, added to both.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.editing.attention import AttentionLayer, AttentionStore, controlled_attention
from nti_lightning.inversion.sampling import SamplingRule, StepCallback, sample


@dataclass(frozen=True)
class EditorSettings:
    """One edit's settings for an editor other than Prompt-to-Prompt (whose settings are its
    controller): a frozen dataclass of the editor's options, checked when built.

    Attributes:
        name (`str`): the editor's name in specs, configs and tables (`editor: masactrl`).
        label (`str`): how pages name it.
        runs_any_rule (`bool`): whether it edits inversions whose methods sample otherwise than
            by plain DDIM steps (edit-friendly DDPM's skip and noise, ProxNPI's guidance).

    PIE-Bench's settings of its rows (`benchmark_source_prompt`, `benchmark_options`,
    `benchmark_inversion`) are the editor's too: `nti bench` asks them and never tests its name.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    runs_any_rule: ClassVar[bool] = False
    #: PIE-Bench: the source prompt its script inverts and edits with (None: the sample's own).
    benchmark_source_prompt: ClassVar[Optional[str]] = None

    @classmethod
    def benchmark_options(cls, method: Optional[str]) -> dict[str, Any]:
        """PIE-Bench: the settings its script (PnP Inversion's `run_editing_*.py`) edits the row of
        inversion method `method` with (`nti bench`'s `<method>+<editor>` rows).

        Args:
            method (`str`, *optional*): the row's inversion method ("ddim", "direct", ...).
        """
        return {}

    @classmethod
    def benchmark_inversion(cls, method: str) -> str:
        """PIE-Bench: the inversion method its script's row of `method` edits (by default `method`'s own).

        Args:
            method (`str`): the row's inversion method.
        """
        return method

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "EditorSettings":
        """The settings with `options` over the defaults; `ValueError` naming an unknown option or
        a value out of range.

        Args:
            options (`Mapping[str, Any]`, *optional*): option name -> value.
        """
        options = dict(options or {})
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{cls.name}: unknown option(s) {unknown}; expected some of {known}")
        return cls(**options)

    def options(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping (what `from_options` takes back)."""
        return dataclasses.asdict(self)

    def check_edit(self, prompts: Sequence[str], is_xl: bool, rule: SamplingRule, method_label: str) -> None:
        """Raises `ValueError` naming why this edit cannot run: its prompts, the model or the
        inversion's method.

        Args:
            prompts (`Sequence[str]`): the edit's prompts, the inversion's source prompt first.
            is_xl (`bool`): whether the model is an SDXL one.
            rule (`SamplingRule`): how the inversion's method samples.
            method_label (`str`): the method's name, for the message.
        """
        if len(prompts) < 2:
            raise ValueError(f"{self.name} edits need a target prompt after the source prompt, got {list(prompts)}")
        if not self.runs_any_rule and not rule.is_plain:
            raise ValueError(
                f"the {self.label} editor runs on inversions sampled by plain DDIM steps, which {method_label}'s "
                "are not: edit it with Prompt-to-Prompt"
            )


@dataclass
class SamplingInputs:
    """What an editor's own `sample` starts from: the batch `edit_jobs_latents` prepared.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        schedule (`DDIMSchedule`): the sampling schedule (T steps).
        z_T (`torch.Tensor`): `[rows, C, h, w]` each row's starting latent (its job's).
        nulls (`Sequence[Condition]`): T per-step unconditional conditions of every row (or one row).
        cond (`Condition`): every row's prompt condition.
        guidance_scale (`float`): w.
        rule (`SamplingRule`): the inversions' combined sampling rule.
        after (`StepCallback`, *optional*): the inversions' source-branch hooks (Direct Inversion's offsets).
        encode (`Callable[[list[str]], Condition]`): prompts -> conditions on the UNet's device
            (the negative prompt or caption an editor adds).
        source_trajectory (`Callable[[torch.Tensor], torch.Tensor]`): `[jobs]` w -> `[T + 1, jobs, C, h, w]`:
            each job's source prompt sampled alone as its inversion's method reconstructs it
            (Direct Inversion's offsets included) at that w, its starting latent first.
        follows_pivot (`Sequence[bool]`): per job, whether its method's source branch retraces the
            inversion's pivot (`InversionMethod.retraces_pivot`: Direct Inversion).
    """

    unet: UNet2DConditionModel
    schedule: DDIMSchedule
    z_T: torch.Tensor
    nulls: Sequence[Condition]
    cond: Condition
    guidance_scale: float
    rule: SamplingRule
    after: Optional[StepCallback]
    encode: Callable[[list[str]], Condition]
    source_trajectory: Callable[[torch.Tensor], torch.Tensor]
    follows_pivot: Sequence[bool] = ()


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

    #: Whether `attend` sees every attention call's queries, keys and values.
    edits_inputs: ClassVar[bool] = False
    #: Whether the attention hook gets both halves of the batch (unconditional rows first).
    sees_all_rows: ClassVar[bool] = False

    #: The settings class of this editor's jobs, for the default `of`.
    settings_type: ClassVar[Optional[type]] = None

    def __init__(self, rows: EditRows) -> None:
        self.rows = rows

    @classmethod
    def of(cls, rows: EditRows) -> Optional["Editor"]:
        """This editor over `rows`, or None when it does not edit them (a job's settings are of
        another editor's kind, or need calls of their own). By default: when every job carries
        `settings_type`'s settings.

        Args:
            rows (`EditRows`): the batch's rows, with each job's settings and store.
        """
        if cls.settings_type is None or not all(isinstance(s, cls.settings_type) for s in rows.settings):
            return None
        return cls(rows)

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

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, layer: AttentionLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With `edits_inputs`: a call's `[batch * heads, tokens, head dim]` queries, keys and
        values (both halves of the batch, row b * heads + h), returned changed or not.

        Args:
            query (`torch.Tensor`): the queries.
            key (`torch.Tensor`): the keys.
            value (`torch.Tensor`): the values.
            heads (`int`): the layer's heads.
            layer (`AttentionLayer`): where the call happens.
        """
        return query, key, value

    def sample(self, inputs: SamplingInputs) -> torch.Tensor:
        """`[rows, C, h, w]` latents at t = 0: the sampler under this editor's hooks (an editor
        with a loop of its own overrides it).

        Args:
            inputs (`SamplingInputs`): the batch.
        """
        with controlled_attention(inputs.unet, self):
            latents = sample(
                inputs.unet,
                inputs.schedule,
                inputs.z_T,
                inputs.nulls,
                inputs.cond,
                inputs.guidance_scale,
                on_step=self.step_hook(inputs.after),
                rule=inputs.rule,
            )
        self.finish()
        return latents


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
