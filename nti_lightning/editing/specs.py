"""Edit specs: what the predict command edits, and the controller each one asks for.

One spec edits one inversion file:

    {"artifact": "inversions/cat.safetensors",
     "prompts": ["a cat sitting on a sofa", "a dog sitting on a sofa"],
     "kind": "replace",                       # "replace" | "refine" | "reweight" | "swap"
     "options": {"cross_replace_steps": 0.8, "self_replace_steps": 0.4,
                 "blend_words": [["cat"], ["dog"]]},
     "id": "cat-to-dog",                      # optional; names the output files
     "editor": "p2p"}                         # optional: "p2p" | "masactrl" | "pnp" | "p2p_zero"

`prompts` are the edit prompts; the artifact's source prompt is put first, unless the list
already starts with it and goes on (the authors' style: source, then edits).
Options by kind:

* every kind but "swap": `cross_replace_steps` (fraction, [start, end], or per word with a
  "default_" key), `self_replace_steps` (fraction or [start, end]), `blend_words` (one word or
  list of words per prompt, source first: turns LocalBlend on), `blend_threshold` (0.3),
  `blend_start` (0.2), `blend_resolution` (side of the maps LocalBlend reads; default the
  coarsest: 16 for SD 1.x at 512 px, 32 for SDXL at 1024 px), `self_replace_max_queries` (1024:
  self-attention is replaced in layers of at most 32x32 queries);
* "reweight": also `words` ({"word": factor}, required) and `base` ("replace", "refine" or
  null: the controller whose maps are scaled).

`editor` other than "p2p" (Prompt-to-Prompt, whose `kind`s these are) edits with MasaCtrl,
Plug-and-Play or Pix2Pix-Zero; the spec then has no `kind` and its `options` are the editor's
settings (`nti_lightning.editing.masactrl.MasaCtrl`, `plug_and_play.PlugAndPlay`,
`pix2pix_zero.Pix2PixZero`), e.g. `{"editor": "masactrl", "options": {"start_step": 4, "start_layer": 10}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from nti_lightning.editing.attention import MAX_QUERIES
from nti_lightning.editing.blend import LocalBlend
from nti_lightning.editing.controllers import (
    AttentionController,
    Refine,
    Replace,
    Reweight,
)
from nti_lightning.editing.editor import EditorSettings
from nti_lightning.editing.editors import EDITORS, P2P, editor_settings
from nti_lightning.errors import NtiError

KINDS = ("replace", "refine", "reweight", "swap")
_CONTROL_OPTIONS = {
    "cross_replace_steps",
    "self_replace_steps",
    "self_replace_max_queries",
    "blend_words",
    "blend_threshold",
    "blend_start",
    "blend_resolution",
}
OPTIONS = {
    "replace": _CONTROL_OPTIONS,
    "refine": _CONTROL_OPTIONS,
    "reweight": _CONTROL_OPTIONS | {"words", "base"},
    "swap": set(),
}
FIELDS = {"artifact", "prompts", "kind", "options", "id", "editor"}


class EditSpecError(NtiError, ValueError):
    """An edit spec is malformed; the message names the spec."""


@dataclass
class EditSpec:
    """One edit of one inversion file.

    Args:
        id (`str`): names the output files.
        artifact (`str`): path of the `.safetensors` inversion.
        prompts (`list[str]`): edit prompts (the source prompt may come first).
        kind (`str`, defaults to "replace"): "replace", "refine", "reweight" or "swap" (no
            control); for another editor than Prompt-to-Prompt, the editor's name.
        options (`dict`, defaults to {}): controller options, or the editor's settings; see the
            module's documentation.
        editor (`str`, defaults to "p2p"): "p2p", "masactrl", "pnp" or "p2p_zero".
    """

    id: str
    artifact: str
    prompts: list[str]
    kind: str = "replace"
    options: dict[str, Any] = field(default_factory=dict)
    editor: str = P2P

    @classmethod
    def from_dict(cls, raw: Any, spec_id: str) -> "EditSpec":
        """Validates a spec read from YAML or JSON; raises `EditSpecError` naming the faulty field."""
        if not isinstance(raw, dict):
            raise EditSpecError(f"a spec must be an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - FIELDS)
        if unknown:
            raise EditSpecError(f"unknown field(s) {unknown}; expected some of {sorted(FIELDS)}")
        artifact, prompts = raw.get("artifact"), raw.get("prompts")
        if not isinstance(artifact, str) or not artifact:
            raise EditSpecError("'artifact' must be the path of an inversion file")
        if isinstance(prompts, str):
            prompts = [prompts]
        # The source prompt may be "" (an image inverted with the empty prompt), the edits may not.
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
            or not all(p.strip() for p in prompts[1:])
            or not (prompts[0].strip() or len(prompts) > 1)
        ):
            raise EditSpecError(f"'prompts' must be a non-empty list of prompts, got {prompts!r}")
        editor = raw.get("editor", P2P)
        if editor not in EDITORS:
            raise EditSpecError(f"unknown editor {editor!r}; expected one of {list(EDITORS)}")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise EditSpecError(f"'options' must be an object, got {options!r}")
        if editor != P2P:
            if "kind" in raw:
                raise EditSpecError(
                    f"'kind' is Prompt-to-Prompt's; the {editor} editor takes its settings in 'options'"
                )
            spec = cls(id=spec_id, artifact=artifact, prompts=list(prompts), kind=editor, options=dict(options),
                       editor=editor)
            spec.editor_settings()  # checked now: a bad setting fails this spec alone
            return spec
        kind = raw.get("kind", "replace")
        if kind not in KINDS:
            raise EditSpecError(f"unknown kind {kind!r}; expected one of {KINDS}")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise EditSpecError(f"'options' must be an object, got {options!r}")
        unknown = sorted(set(options) - OPTIONS[kind])
        if unknown:
            raise EditSpecError(
                f"option(s) {unknown} do not apply to kind {kind!r}; allowed: {sorted(OPTIONS[kind])}"
            )
        if kind == "reweight" and not isinstance(options.get("words"), dict):
            raise EditSpecError('kind "reweight" needs options.words, e.g. {"fluffy": 2.0}')
        if options.get("base") not in (None, "replace", "refine"):
            raise EditSpecError("options.base must be 'replace', 'refine' or null")
        return cls(id=spec_id, artifact=artifact, prompts=list(prompts), kind=kind, options=dict(options))

    def editor_settings(self) -> Optional[EditorSettings]:
        """The settings of its editor other than Prompt-to-Prompt (None for "p2p").

        Raises:
            `EditSpecError` naming an unknown setting or a value out of range.
        """
        if self.editor == P2P:
            return None
        try:
            return editor_settings(self.editor, self.options)
        except ValueError as error:
            raise EditSpecError(str(error)) from None

    def all_prompts(self, source: str) -> list[str]:
        """The source prompt followed by the edit prompts.

        A list that already starts with the source and goes on is taken as it is; otherwise the
        source is put first (so `["a cat"]` with source "a cat" reweights "a cat" itself).
        """
        if len(self.prompts) > 1 and self.prompts[0] == source:
            return list(self.prompts)
        return [source, *self.prompts]

    def controller(
        self,
        prompts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        cross_replace_steps: Any = 0.8,
        self_replace_steps: Any = 0.4,
        self_replace_max_queries: int = MAX_QUERIES,
        blend_resolution: Optional[int] = None,
    ) -> Optional[AttentionController]:
        """The spec's controller for `prompts` (None for "swap" and other editors); the defaults
        apply unless the spec sets them.

        Raises:
            `EditSpecError` naming the prompt or word the controller cannot use.
        """
        if self.kind == "swap" or self.editor != P2P:
            return None
        options = self.options
        steps = {
            "cross_replace_steps": options.get("cross_replace_steps", cross_replace_steps),
            "self_replace_steps": options.get("self_replace_steps", self_replace_steps),
            "self_replace_max_queries": options.get("self_replace_max_queries", self_replace_max_queries),
        }
        try:
            blend = None
            if options.get("blend_words") is not None:
                blend = LocalBlend(
                    prompts,
                    tokenizer,
                    options["blend_words"],
                    threshold=float(options.get("blend_threshold", 0.3)),
                    start=float(options.get("blend_start", 0.2)),
                    resolution=options.get("blend_resolution", blend_resolution),
                )
            if self.kind == "reweight":
                base_kind = options.get("base")
                base = None
                if base_kind is not None:
                    base_class = Replace if base_kind == "replace" else Refine
                    base = base_class(prompts, tokenizer, local_blend=blend, **steps)
                return Reweight(prompts, tokenizer, words=options["words"], base=base, local_blend=blend, **steps)
            return (Replace if self.kind == "replace" else Refine)(prompts, tokenizer, local_blend=blend, **steps)
        except (ValueError, TypeError) as error:
            raise EditSpecError(str(error)) from error
