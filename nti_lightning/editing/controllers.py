"""Prompt-to-Prompt controllers: how the edit prompts' attention maps are taken from the source's.

A controller sees the conditional attention maps `[P, heads, queries, keys]` of the P prompts of
one batch (prompt 0 is the source) at every attention layer and step, and returns them with the
edit prompts' maps (1..P-1) changed:

* cross-attention: `edit = alpha_t * replace_cross(source, edit) + (1 - alpha_t) * edit`, where
  `alpha_t` is 1 on the steps of `cross_replace_steps` (per token, so per word if asked) and
  `replace_cross` is the controller's own: `Replace`, `Refine` or `Reweight`;
* self-attention: the edit prompts take the source's maps on the steps of `self_replace_steps`,
  in layers with at most `self_replace_max_queries` query positions (32x32 by default).

Which layers: SD 1.x at 512 px attends at 64x64, 32x32, 16x16 and 8x8, and the authors replace
self-attention in all but the 64x64 layers. SDXL at 1024 px attends at 64x64 (2 transformer
layers per block) and 32x32 (10 per block): the same 32x32 bound keeps its 32x32 layers, the
same share of the image per query (1/32 of the side) as SD 1.x's coarsest replaced maps, and
leaves the 64x64 ones, whose explicit `[queries, queries]` maps would also cost 16x the memory.
`self_replace_max_queries=64**2` replaces those too.

Semantics follow the authors' `AttentionControlEdit` and its subclasses (google/prompt-to-prompt,
`prompt-to-prompt_stable.ipynb`), including their step windows: a cross-attention window
`(start, end)` covers steps `int(start * (T + 1)) <= i < int(end * (T + 1))`, a self-attention
window `int(start * T) <= i < int(end * T)`.

The controllers describe an edit; they do not compute it. Each states its `replace_cross` as a
`CrossForm` (token mapper, aligned tokens, factors), and `begin` turns its windows into per-step
tensors; `job_control` hands them over as a `JobControl`, and
`nti_lightning.editing.batched_control.BatchedControl` runs them, for one edit or for a batch of
them. A controller called on its own (`__call__`, `end_step`: what a user's subclass extends) runs
a `BatchedControl` of its own rows, so Prompt-to-Prompt's maths has one path.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from nti_lightning.editing.alignment import (
    refinement_mapper,
    replacement_mapper,
    word_positions,
)
from nti_lightning.editing.attention import MAX_QUERIES, AttentionLayer, AttentionStore
from nti_lightning.editing.batched_control import (
    BatchedControl,
    ConversionCache,
    CrossForm,
    JobControl,
    StackedForms,
    converted_once,
)
from nti_lightning.editing.blend import LocalBlend
from nti_lightning.editing.editor import EditRows

#: A fraction f of the steps (from the start: (0, f)) or a (start, end) pair of fractions.
StepsWindow = Union[float, tuple[float, float]]
#: One window for every token, or per word: {"default_": window, "word": window, ...}.
CrossReplaceSteps = Union[StepsWindow, Mapping[str, StepsWindow]]

DEFAULT_KEY = "default_"


def steps_window(value: StepsWindow, what: str) -> tuple[float, float]:
    """`(start, end)` fractions of the sampling steps from a float f (= (0, f)) or a pair."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        window = (0.0, float(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        window = (float(value[0]), float(value[1]))
    else:
        raise ValueError(f"{what} must be a fraction or a (start, end) pair of fractions, got {value!r}")
    if not 0.0 <= window[0] <= window[1] <= 1.0:
        raise ValueError(f"{what} must satisfy 0 <= start <= end <= 1, got {value!r}")
    return window


def cross_replace_windows(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, cross_replace_steps: CrossReplaceSteps
) -> torch.Tensor:
    """`[P-1, K, 2]` float64 (start, end) step fractions for every token of every edit prompt.

    Per-word entries override the default for that word's tokens in each edit prompt holding it;
    a word found in none of them is an error (a typo would otherwise be silently ignored).
    """
    if isinstance(cross_replace_steps, Mapping):
        per_word = dict(cross_replace_steps)
        default = steps_window(per_word.pop(DEFAULT_KEY, (0.0, 1.0)), "cross_replace_steps['default_']")
    else:
        per_word, default = {}, steps_window(cross_replace_steps, "cross_replace_steps")
    windows = torch.tensor(default, dtype=torch.float64).repeat(len(prompts) - 1, tokenizer.model_max_length, 1)
    for word, value in per_word.items():
        window = torch.tensor(steps_window(value, f"cross_replace_steps[{word!r}]"), dtype=torch.float64)
        found = False
        for index, prompt in enumerate(prompts[1:]):
            try:
                positions = word_positions(prompt, word, tokenizer)
            except ValueError:
                continue
            windows[index, positions] = window
            found = True
        if not found:
            raise ValueError(f"cross_replace_steps word {word!r} is in none of the edit prompts {list(prompts[1:])}")
    return windows


def cross_form_of(controller: "AttentionController") -> Optional[CrossForm]:
    """`controller.cross_form()` where it states the controller's `replace_cross`, else None.

    It does where `replace_cross` is the base's (which applies the form) or is defined by the
    class that defines `cross_form`; not where a subclass changed `replace_cross` alone (a
    user's own kind, whose maps only its own `replace_cross` knows).

    Args:
        controller (`AttentionController`): any controller.
    """

    def owner(name: str) -> type:
        return next(kind for kind in type(controller).__mro__ if name in vars(kind))

    replace_owner = owner("replace_cross")
    if replace_owner is not AttentionController and replace_owner is not owner("cross_form"):
        return None
    return controller.cross_form()


class AttentionController:
    """Base of the Prompt-to-Prompt controllers (the authors' `AttentionControlEdit`).

    A subclass states how the edit prompts' cross-attention maps come from the source's: a
    `cross_form` (the built-in ones), or its own `replace_cross` (a user's kind: it runs on the
    edit's rows alone, see `job_control`). `edit` calls `begin` before sampling; the edit's
    attention hook and step hook are then those of `nti_lightning.editing.batched_control.BatchedControl`,
    or this controller's `__call__` and `end_step` (which run one over its own rows) where a
    subclass changed them.

    Args:
        prompts (`Sequence[str]`): the source prompt, then one or more edit prompts.
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer (`pipeline.tokenizer`).
        cross_replace_steps (`float`, `(float, float)` or `dict`, defaults to 0.8): steps during
            which the edit prompts' cross-attention is replaced: a fraction f from the start, a
            (start, end) pair, or per word `{"default_": 0.8, "dog": 0.3}`.
        self_replace_steps (`float` or `(float, float)`, defaults to 0.4): steps during which the
            edit prompts take the source's self-attention (layers with <= 32x32 queries only).
        local_blend (`LocalBlend`, *optional*): keep the source outside the edited words' region.
        self_replace_max_queries (`int`, defaults to 1024): self-attention is replaced in layers
            with at most this many query positions (32x32: see the module's documentation).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        cross_replace_steps: CrossReplaceSteps = 0.8,
        self_replace_steps: StepsWindow = 0.4,
        local_blend: Optional[LocalBlend] = None,
        self_replace_max_queries: int = MAX_QUERIES,
    ) -> None:
        if isinstance(prompts, str) or len(prompts) < 2:
            raise ValueError(f"a controller needs the source prompt and at least one edit prompt, got {prompts!r}")
        self.prompts = list(prompts)
        self.cross_replace_steps = cross_replace_steps
        self.self_replace_steps = self_replace_steps
        self.cross_windows = cross_replace_windows(self.prompts, tokenizer, cross_replace_steps)
        self.self_window = steps_window(self_replace_steps, "self_replace_steps")
        if local_blend is not None and local_blend.prompts != self.prompts:
            raise ValueError(f"local_blend was built for prompts {local_blend.prompts}, not {self.prompts}")
        self.local_blend = local_blend
        max_queries = self_replace_max_queries
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(
                f"self_replace_max_queries must be a positive number of query positions, got {max_queries!r}"
            )
        self.self_replace_max_queries = max_queries
        self.store = self.new_store()
        self.num_steps = 0
        self.cross_alpha = torch.zeros(0)
        self.self_steps = (0, 0)
        self._on_device: ConversionCache = {}
        self._forms: Optional[StackedForms] = None  # the form `replace_cross` applies, once stacked
        self._alone: Optional[BatchedControl] = None  # the control of this controller's own calls

    def begin(self, num_steps: int, store: Optional[AttentionStore] = None) -> "AttentionController":
        """Prepares a sampling run of `num_steps` steps (the controller can be reused).

        Args:
            num_steps (`int`): T.
            store (`AttentionStore`, *optional*): where the run's maps are recorded (reset here);
                defaults to a new `new_store()`.
        """
        self.num_steps = num_steps
        self.store = store if store is not None else self.new_store()
        self.store.reset()
        # The authors' cross-attention windows are cut on T + 1 rows, self-attention ones on T.
        bounds = (self.cross_windows * (num_steps + 1)).long()
        steps = torch.arange(num_steps)[:, None, None]
        self.cross_alpha = ((steps >= bounds[..., 0]) & (steps < bounds[..., 1])).float()  # [T, P-1, K]
        self.self_steps = (int(num_steps * self.self_window[0]), int(num_steps * self.self_window[1]))
        self._on_device.clear()
        # This controller's own calls run the batched control over its rows alone: one path for the maths.
        rows = EditRows((len(self.prompts),), (self,), (self.store,), num_steps)
        self._alone = BatchedControl(rows, [self._control()])
        return self

    @property
    def step(self) -> int:
        """The sampling step that this controller's own next calls belong to (0 before `begin`)."""
        alone = getattr(self, "_alone", None)
        return alone.step if alone is not None else 0

    @step.setter
    def step(self, value: int) -> None:
        # Before `begin` there is no run: only its start (0) may be set (as a subclass's own reset may).
        if getattr(self, "_alone", None) is None and value == 0:
            return
        self._begun().step = value

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        """Edits `[P, heads, queries, keys]` conditional maps of one layer at the current step
        (in place when nothing tracks gradients) and records them in `store`.

        Args:
            probs (`torch.Tensor`): the maps of this controller's P prompts.
            layer (`AttentionLayer`): where the call happens.
        """
        return self._begun()(probs, layer)

    def end_step(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        """After sampling step `step`: applies LocalBlend and moves on (the sampler's `on_step`).

        Args:
            step (`int`): the step just taken (0-based).
            timestep (`int`): its timestep (unused: the blend goes by steps).
            latents (`torch.Tensor`): `[P, C, h, w]` latents after it.
        """
        return self._begun().end_step(step, latents)

    def new_store(self) -> AttentionStore:
        """An attention store that keeps the maps LocalBlend reads (32x32 and coarser, or its
        own `resolution` when that is finer)."""
        resolution = self.local_blend.resolution if self.local_blend is not None else None
        return AttentionStore(max_queries=max(MAX_QUERIES, (resolution or 0) ** 2))

    def job_control(self) -> Optional[JobControl]:
        """This controller's edit as tensors over its rows, for the run `begin` prepared: what a
        `BatchedControl` of many edits runs. None when calls of its own are needed instead: a
        subclass's own `__call__` or `end_step`, a blend of another class than `LocalBlend`, or
        a `replace_cross` without a `CrossForm`."""
        kind = type(self)
        if kind.__call__ is not AttentionController.__call__ or kind.end_step is not AttentionController.end_step:
            return None
        if self.local_blend is not None and type(self.local_blend) is not LocalBlend:
            return None
        control = self._control()
        return control if control.form is not None else None

    def _control(self) -> JobControl:
        """The run's tensors, with this controller's own `replace_cross` where it has no form."""
        if self.cross_alpha.shape[0] != self.num_steps or self.num_steps == 0:
            raise RuntimeError(f"{type(self).__name__}: call begin(num_steps) before sampling")
        form = cross_form_of(self)
        own = self.replace_cross if form is None else None
        return JobControl(self.cross_alpha, self.self_steps, self.self_replace_max_queries, form, own, self.local_blend)

    def _begun(self) -> BatchedControl:
        """The control of this controller's own calls, once `begin` made it."""
        if getattr(self, "_alone", None) is None:
            raise RuntimeError(f"{type(self).__name__}: call begin(num_steps) before sampling")
        return self._alone

    def replace_cross(self, base: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """`[P-1, heads, queries, keys]` maps for the edit prompts from the source's
        `[heads, queries, keys]`: the controller's `cross_form` applied (a subclass may define
        its own instead).

        Args:
            base (`torch.Tensor`): `[heads, queries, keys]` the source prompt's maps.
            edits (`torch.Tensor`): `[P-1, heads, queries, keys]` the edit prompts' own maps.
        """
        if self._forms is None:
            form = self.cross_form()
            if form is None:
                raise NotImplementedError(f"{type(self).__name__} defines neither replace_cross nor cross_form")
            self._forms = StackedForms([form])
        return self._forms.replaced(base.expand_as(edits), edits)

    def cross_form(self) -> Optional[CrossForm]:
        """`replace_cross` as a `CrossForm`, or None when it has none (then the edit runs on its
        own rows, calling `replace_cross`)."""
        return None

    def on_device(self, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`tensor` on `like`'s device (and dtype, unless it holds indices), converted once per run.

        Args:
            name (`str`): the tensor's key.
            tensor (`torch.Tensor`): the tensor, on the host.
            like (`torch.Tensor`): a tensor of the device and float dtype wanted.
        """
        return converted_once(self._on_device, name, tensor, like)


class Replace(AttentionController):
    """Word swap: the edit's cross-attention maps are the source's, mapped word to word.

    The prompts must have the same number of words ("a cat riding a bicycle" -> "a cat riding a
    car"); a word split into k tokens gets 1/k of the source word's maps on each token.

    Args:
        prompts (`Sequence[str]`): the source prompt, then the edit prompts.
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        cross_replace_steps (`float`, `(float, float)` or `dict`, defaults to 0.8): see `AttentionController`.
        self_replace_steps (`float` or `(float, float)`, defaults to 0.4): see `AttentionController`.
        local_blend (`LocalBlend`, *optional*): see `AttentionController`.
        self_replace_max_queries (`int`, defaults to 1024): see `AttentionController`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        cross_replace_steps: CrossReplaceSteps = 0.8,
        self_replace_steps: StepsWindow = 0.4,
        local_blend: Optional[LocalBlend] = None,
        self_replace_max_queries: int = MAX_QUERIES,
    ) -> None:
        super().__init__(
            prompts, tokenizer, cross_replace_steps, self_replace_steps, local_blend, self_replace_max_queries
        )
        self.mappers = torch.stack([replacement_mapper(self.prompts[0], p, tokenizer) for p in self.prompts[1:]])

    def cross_form(self) -> CrossForm:
        """Every edit token takes its mapped source tokens' maps (`mappers`)."""
        ones = torch.ones(self.mappers.shape[:2])
        return CrossForm(self.mappers.float(), ones, ones.clone())


class Refine(AttentionController):
    """Added words: tokens aligned with the source's take its maps, inserted tokens keep their own.

    ("a cat" -> "a fluffy cat"). The alignment is a global alignment of the token ids.

    Args:
        prompts (`Sequence[str]`): the source prompt, then the edit prompts.
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        cross_replace_steps (`float`, `(float, float)` or `dict`, defaults to 0.8): see `AttentionController`.
        self_replace_steps (`float` or `(float, float)`, defaults to 0.4): see `AttentionController`.
        local_blend (`LocalBlend`, *optional*): see `AttentionController`.
        self_replace_max_queries (`int`, defaults to 1024): see `AttentionController`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        cross_replace_steps: CrossReplaceSteps = 0.8,
        self_replace_steps: StepsWindow = 0.4,
        local_blend: Optional[LocalBlend] = None,
        self_replace_max_queries: int = MAX_QUERIES,
    ) -> None:
        super().__init__(
            prompts, tokenizer, cross_replace_steps, self_replace_steps, local_blend, self_replace_max_queries
        )
        pairs = [refinement_mapper(self.prompts[0], p, tokenizer) for p in self.prompts[1:]]
        self.mappers = torch.stack([mapper for mapper, _ in pairs])  # [P-1, K] source position
        self.aligned = torch.stack([weights for _, weights in pairs])  # [P-1, K] 1 aligned, 0 inserted

    def cross_form(self) -> CrossForm:
        """Aligned edit tokens take their source token's maps, inserted ones keep their own."""
        # Taking column mappers[p, n] is a product with its one-hot matrix (exact: one term).
        tokens = self.mappers.shape[1]
        mapper = F.one_hot(self.mappers.long(), tokens).transpose(1, 2).float()  # [P-1, w, n]
        return CrossForm(mapper, self.aligned.float(), torch.ones(self.aligned.shape))


class Reweight(AttentionController):
    """Scales the cross-attention of chosen words ("fluffy": 2 makes the edit fluffier).

    Alone, the edit prompts get the source's maps with the words' columns scaled (use the source
    prompt again, or a variant with the same words). With `base`, the base controller's maps
    (Replace or Refine) are scaled instead.

    Args:
        prompts (`Sequence[str]`): the source prompt, then the edit prompts.
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        words (`Mapping[str, float]`): factor per word; each word must be in every edit prompt.
        base (`AttentionController`, *optional*): controller (same prompts) whose maps are scaled.
        cross_replace_steps (`float`, `(float, float)` or `dict`, *optional*): defaults to the
            base's, or 0.8 without a base; see `AttentionController`.
        self_replace_steps (`float` or `(float, float)`, *optional*): defaults to the base's, or
            0.4 without a base.
        local_blend (`LocalBlend`, *optional*): defaults to the base's.
        self_replace_max_queries (`int`, *optional*): defaults to the base's, or 1024 without a
            base; see `AttentionController`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        words: Mapping[str, float],
        base: Optional[AttentionController] = None,
        cross_replace_steps: Optional[CrossReplaceSteps] = None,
        self_replace_steps: Optional[StepsWindow] = None,
        local_blend: Optional[LocalBlend] = None,
        self_replace_max_queries: Optional[int] = None,
    ) -> None:
        if base is not None and list(base.prompts) != list(prompts):
            raise ValueError(f"Reweight's base was built for prompts {base.prompts}, not {list(prompts)}")
        if cross_replace_steps is None:
            cross_replace_steps = base.cross_replace_steps if base is not None else 0.8
        if self_replace_steps is None:
            self_replace_steps = base.self_replace_steps if base is not None else 0.4
        if local_blend is None and base is not None:
            local_blend = base.local_blend
        if self_replace_max_queries is None:
            self_replace_max_queries = base.self_replace_max_queries if base is not None else MAX_QUERIES
        super().__init__(
            prompts, tokenizer, cross_replace_steps, self_replace_steps, local_blend, self_replace_max_queries
        )
        if not words:
            raise ValueError("Reweight needs at least one word and its factor")
        self.base = base
        self.words = dict(words)
        self.factors = torch.ones(len(self.prompts) - 1, tokenizer.model_max_length)  # [P-1, K]
        for word, factor in self.words.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)):
                raise ValueError(f"Reweight factor of {word!r} must be a number, got {factor!r}")
            for index, prompt in enumerate(self.prompts[1:]):
                self.factors[index, word_positions(prompt, word, tokenizer)] = float(factor)

    def replace_cross(self, base: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """The form's maps; on top of a base of the user's own kind (which has no form), the
        base's `replace_cross` scaled by the factors.

        Args:
            base (`torch.Tensor`): `[heads, queries, keys]` the source prompt's maps.
            edits (`torch.Tensor`): `[P-1, heads, queries, keys]` the edit prompts' own maps.
        """
        if self.base is None or cross_form_of(self.base) is not None:
            return super().replace_cross(base, edits)
        return self.base.replace_cross(base, edits) * self.on_device("factors", self.factors, base)[:, None, None, :]

    def cross_form(self) -> Optional[CrossForm]:
        """The base's form (the source's maps token for token without one), its factors scaled
        by this one's; None on a base without form."""
        if self.base is None:
            form = CrossForm.identity(*self.factors.shape)
        else:
            form = cross_form_of(self.base)
            if form is None:
                return None
        return CrossForm(form.mapper, form.aligned, form.factors * self.factors)
