"""The editors by name: Prompt-to-Prompt's (`p2p`, its settings are its controller) and the
others', whose settings an edit spec, `edit(editor=...)`, `nti bench` and the app name.

A new editor is one module (its `EditorSettings` and its `Editor`), one line in
`EDITOR_SETTINGS` below and its `Editor` in `nti_lightning.editing.edit.EDITORS`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from nti_lightning.editing.editor import EditorSettings
from nti_lightning.editing.masactrl import MasaCtrl
from nti_lightning.editing.pix2pix_zero import Pix2PixZero
from nti_lightning.editing.plug_and_play import PlugAndPlay

#: Prompt-to-Prompt's name: its edits carry a controller (kinds replace, refine, reweight).
P2P = "p2p"
#: The other editors' settings by name, in the order pages and tables list them.
EDITOR_SETTINGS: dict[str, type[EditorSettings]] = {
    settings.name: settings for settings in (MasaCtrl, PlugAndPlay, Pix2PixZero)
}
#: Every editor's name, Prompt-to-Prompt's first.
EDITORS: tuple[str, ...] = (P2P, *EDITOR_SETTINGS)


def editor_settings(name: str, options: Optional[Mapping[str, Any]] = None) -> EditorSettings:
    """The settings of the editor called `name` with `options` over its defaults.

    Args:
        name (`str`): "masactrl", "pnp" or "p2p_zero".
        options (`Mapping[str, Any]`, *optional*): its options.

    Raises:
        `ValueError` naming an unknown editor (and the choices), an unknown option or a value out of range.
    """
    if name == P2P:
        raise ValueError("Prompt-to-Prompt's settings are its controller (Replace, Refine, Reweight)")
    if name not in EDITOR_SETTINGS:
        raise ValueError(f"unknown editor {name!r}; expected one of {list(EDITORS)}")
    try:
        return EDITOR_SETTINGS[name].from_options(options)
    except TypeError as error:
        raise ValueError(f"{name}: {error}") from None
