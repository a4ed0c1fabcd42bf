"""What a user asks the app for, read from the page's fields and checked before any model runs.

Every mistake is an `AppInputError` (an `NtiError`) whose message names the field and the value,
so that the page can show it as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from nti_lightning.editing.alignment import word_positions
from nti_lightning.editing.editor import EditorSettings
from nti_lightning.editing.editors import EDITOR_SETTINGS, EDITORS, P2P, editor_settings
from nti_lightning.errors import NtiError
from nti_lightning.inversion.methods import METHODS

#: The edit kinds a user picks from; "auto" is Replace when every target has the source's word
#: count, Refine otherwise.
KINDS = ("auto", "replace", "refine")
#: Bounds of the inversion settings the page offers.
MAX_STEPS = 1000
MAX_INNER_STEPS = 100
#: The editors a user picks from, by name: Prompt-to-Prompt (the kinds above) first, then the
#: others, each with its own settings (`nti_lightning.editing.editors`).
EDITOR_LABELS = {P2P: "Prompt-to-Prompt", **{name: settings.label for name, settings in EDITOR_SETTINGS.items()}}


class AppInputError(NtiError, ValueError):
    """A field of the page holds something the app cannot use; the message names it."""


def source_prompt(text: Optional[str]) -> str:
    """The source prompt, stripped; refused when empty."""
    prompt = " ".join((text or "").split())
    if not prompt:
        raise AppInputError("the source prompt is empty: describe the image, e.g. 'a red circle on a green background'")
    return prompt


@dataclass(frozen=True)
class InversionSettings:
    """The settings of one inversion (they enter its cache key).

    Args:
        method (`str`, defaults to "null_text"): one of `nti_lightning.inversion.methods.METHODS`.
        num_inference_steps (`int`, defaults to 50): T.
        guidance_scale (`float`, defaults to 7.5): w.
        num_inner_steps (`int`, defaults to 10): N.
        early_stop_epsilon (`float`, defaults to 1e-5): ε.
        learning_rate (`float`, defaults to 1e-2): Adam's rate at step 0.
    """

    method: str = "null_text"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    num_inner_steps: int = 10
    early_stop_epsilon: float = 1e-5
    learning_rate: float = 1e-2

    def checked(self) -> "InversionSettings":
        """The settings with whole numbers made ints; `AppInputError` naming a bad one."""
        if self.method not in METHODS:
            raise AppInputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        steps, inner = _whole(self.num_inference_steps, "steps (T)"), _whole(self.num_inner_steps, "inner steps (N)")
        if not 1 <= steps <= MAX_STEPS:
            raise AppInputError(f"steps (T) must be between 1 and {MAX_STEPS}, got {steps}")
        if not 1 <= inner <= MAX_INNER_STEPS:
            raise AppInputError(f"inner steps (N) must be between 1 and {MAX_INNER_STEPS}, got {inner}")
        for name, value in (
            ("guidance scale (w)", self.guidance_scale),
            ("early-stop ε", self.early_stop_epsilon),
            ("learning rate", self.learning_rate),
        ):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise AppInputError(f"{name} must be a non-negative number, got {value!r}")
        return InversionSettings(
            self.method,
            steps,
            float(self.guidance_scale),
            inner,
            float(self.early_stop_epsilon),
            float(self.learning_rate),
        )

    def invert_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `nti_lightning.invert` these settings stand for."""
        return {
            "method": self.method,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "num_inner_steps": self.num_inner_steps,
            "early_stop_epsilon": self.early_stop_epsilon,
            "learning_rate": self.learning_rate,
        }


@dataclass(frozen=True)
class EditRequest:
    """One edit of the session's inversion.

    Args:
        targets (`list[str]`): the target prompts (one image each).
        kind (`str`, defaults to "auto"): "auto", "replace" or "refine".
        cross_replace_steps (`float`, defaults to 0.8): share of the steps with cross-attention replaced.
        self_replace_steps (`float`, defaults to 0.4): share of the steps with self-attention replaced.
        reweights (`dict[str, float]`, defaults to {}): word -> factor of its cross-attention.
        blend_words (`list[str]`, defaults to []): LocalBlend words; each prompt blends those it holds.
        guidance_scale (`float`, *optional*): w; the inversion's own when None.
        editor (`str`, defaults to "p2p"): "p2p" (Prompt-to-Prompt: the kind, replace steps, word
            weights and LocalBlend words above), "masactrl", "pnp" or "p2p_zero".
        editor_options (`dict[str, Any]`, defaults to {}): the settings of an editor other than
            Prompt-to-Prompt over its defaults (`nti_lightning.editing.editors.editor_settings`).
    """

    targets: list[str]
    kind: str = "auto"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    reweights: dict[str, float] = field(default_factory=dict)
    blend_words: list[str] = field(default_factory=list)
    guidance_scale: Optional[float] = None
    editor: str = P2P
    editor_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_fields(
        cls,
        targets: Optional[str],
        kind: Optional[str] = "auto",
        cross_replace_steps: float = 0.8,
        self_replace_steps: float = 0.4,
        reweights: Optional[str] = "",
        blend_words: Optional[str] = "",
        guidance_scale: Optional[float] = None,
        editor: Optional[str] = P2P,
        editor_options: Optional[Mapping[str, Any]] = None,
    ) -> "EditRequest":
        """Reads the page's fields: targets one per line, reweights "word=factor, ...", blend words
        separated by commas or spaces; the editor and its settings (`editor_fields`), checked."""
        prompts = [" ".join(line.split()) for line in (targets or "").splitlines()]
        prompts = [prompt for prompt in prompts if prompt]
        if not prompts:
            raise AppInputError(
                "no target prompt: write one or more, one per line (e.g. 'a blue circle on a green background')"
            )
        kind = kind or "auto"
        if kind not in KINDS:
            raise AppInputError(f"edit kind must be one of {', '.join(KINDS)}, got {kind!r}")
        for name, value in (
            ("cross-attention replace steps", cross_replace_steps),
            ("self-attention replace steps", self_replace_steps),
        ):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise AppInputError(f"{name} must be a fraction between 0 and 1, got {value!r}")
        if guidance_scale is not None and (
            not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0
        ):
            raise AppInputError(f"guidance scale (w) must be a non-negative number, got {guidance_scale!r}")
        request = cls(
            targets=prompts,
            kind=kind,
            cross_replace_steps=float(cross_replace_steps),
            self_replace_steps=float(self_replace_steps),
            reweights=parse_reweights(reweights or ""),
            blend_words=(blend_words or "").replace(",", " ").split(),
            guidance_scale=None if guidance_scale is None else float(guidance_scale),
            editor=editor or P2P,
            editor_options=dict(editor_options or {}),
        )
        request.editor_settings()  # a bad editor or setting is refused before any model runs
        return request

    def editor_settings(self) -> Optional[EditorSettings]:
        """The settings of its editor other than Prompt-to-Prompt (None for "p2p").

        Raises:
            `AppInputError` naming an unknown editor, an unknown setting or a value out of range.
        """
        if self.editor not in EDITORS:
            raise AppInputError(f"editor must be one of {', '.join(EDITORS)}, got {self.editor!r}")
        if self.editor == P2P:
            return None
        try:
            return editor_settings(self.editor, self.editor_options)
        except ValueError as error:  # "masactrl: start_step must be ...": named by its label instead
            message = str(error).removeprefix(f"{self.editor}: ")
            raise AppInputError(f"{EDITOR_LABELS[self.editor]} settings: {message}") from None

    def resolved_kind(self, source: str) -> str:
        """"replace" or "refine": the user's choice, or what "auto" picks for these prompts."""
        return self.kind if self.kind != "auto" else auto_kind(source, self.targets)

    def spec(self, source: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The edit as an `nti predict` spec (`nti_lightning.editing.specs.EditSpec.from_dict`): for
        an editor other than Prompt-to-Prompt, its name and its settings, without a kind."""
        if self.editor_settings() is not None:
            return {
                "artifact": "<app>",
                "prompts": [source, *self.targets],
                "editor": self.editor,
                "options": dict(self.editor_options),
            }
        kind = self.resolved_kind(source)
        options: dict[str, Any] = {
            "cross_replace_steps": self.cross_replace_steps,
            "self_replace_steps": self.self_replace_steps,
        }
        prompts = [source, *self.targets]
        if self.blend_words:
            options["blend_words"] = blend_words_per_prompt(prompts, self.blend_words, tokenizer)
        if self.reweights:
            return {
                "artifact": "<app>",
                "prompts": prompts,
                "kind": "reweight",
                "options": {**options, "words": dict(self.reweights), "base": kind},
            }
        return {"artifact": "<app>", "prompts": prompts, "kind": kind, "options": options}


def auto_kind(source: str, targets: Sequence[str]) -> str:
    """Replace when every target has as many words as the source, else Refine."""
    count = len(source.split())
    return "replace" if all(len(target.split()) == count for target in targets) else "refine"


def editor_fields(
    editor: Optional[str],
    start_step: Any = None,
    start_layer: Any = None,
    feature_steps: Any = None,
    attention_steps: Any = None,
    guidance_amount: Any = None,
    caption: Optional[str] = None,
) -> dict[str, Any]:
    """The chosen editor's settings from the page's fields (those of the other editors are left
    out; a field left empty keeps the editor's default). They are checked by `EditRequest`.

    Args:
        editor (`str`, *optional*): "p2p", "masactrl", "pnp" or "p2p_zero".
        start_step, start_layer: MasaCtrl's (whole numbers: a slider's 4.0 is 4).
        feature_steps, attention_steps: Plug-and-Play's shares of the steps.
        guidance_amount: Pix2Pix-Zero's cross-attention guidance step.
        caption (`str`, *optional*): Pix2Pix-Zero's caption of the image; empty: the source prompt.
    """
    if editor == "masactrl":
        fields = {"start_step": _integral(start_step), "start_layer": _integral(start_layer)}
    elif editor == "pnp":
        fields = {"feature_steps": feature_steps, "attention_steps": attention_steps}
    elif editor == "p2p_zero":
        fields = {"guidance_amount": guidance_amount, "caption": " ".join((caption or "").split()) or None}
    else:
        return {}
    return {name: value for name, value in fields.items() if value is not None}


def kind_note(source: Optional[str], targets: Optional[str], kind: Optional[str], editor: Optional[str] = P2P) -> str:
    """The line the page shows beside the kind: what will be used, and why."""
    if editor and editor != P2P:
        return f"**{EDITOR_LABELS.get(editor, editor)}**, with its own settings below"
    source = " ".join((source or "").split())
    prompts = [line for line in (targets or "").splitlines() if line.strip()]
    if kind in ("replace", "refine"):
        return f"**{kind.capitalize()}** (chosen)"
    if not source or not prompts:
        return "auto: **Replace** when the word counts match, else **Refine**"
    picked = auto_kind(source, prompts)
    why = "every target has the source's word count" if picked == "replace" else "the word counts differ"
    return f"auto: **{picked.capitalize()}** ({why})"


def parse_reweights(text: str) -> dict[str, float]:
    """ "fluffy=2, red=0.5" -> {"fluffy": 2.0, "red": 0.5}; `AppInputError` naming a bad entry."""
    weights: dict[str, float] = {}
    for entry in text.replace(";", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        word, sep, factor = entry.partition("=")
        word = word.strip()
        if not sep or not word or len(word.split()) != 1:
            raise AppInputError(f"word weights are 'word=factor' entries separated by commas; cannot read {entry!r}")
        try:
            value = float(factor)
        except ValueError:
            raise AppInputError(f"the factor of {word!r} must be a number, got {factor.strip()!r}") from None
        if not math.isfinite(value) or value < 0:
            raise AppInputError(f"the factor of {word!r} must be a non-negative number, got {value}")
        weights[word] = value
    return weights


def blend_words_per_prompt(
    prompts: Sequence[str], words: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> list[list[str]]:
    """For each prompt, the LocalBlend words it holds; `AppInputError` for a word in none of them."""
    found = [[word for word in words if _holds(prompt, word, tokenizer)] for prompt in prompts]
    missing = [word for word in words if not any(word in entry for entry in found)]
    if missing:
        raise AppInputError(
            f"LocalBlend word(s) {', '.join(repr(w) for w in missing)} in none of the prompts {list(prompts)}"
        )
    return found


def _holds(prompt: str, word: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    try:
        word_positions(prompt, word, tokenizer)
    except ValueError:
        return False
    return True


def _integral(value: Any) -> Any:
    """A whole float as an int (a slider sends 4.0); anything else as it is, for the settings to check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise AppInputError(f"{name} must be a whole number, got {value!r}")
    return int(value)
