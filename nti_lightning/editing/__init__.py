"""Editing inverted images: attention control, Prompt-to-Prompt's controllers, the editors (MasaCtrl,
Plug-and-Play, Pix2Pix-Zero), `edit`, the predict CLI."""

from nti_lightning.editing.attention import (
    AttentionLayer,
    AttentionStore,
    ControlledAttnProcessor,
    controlled_attention,
)
from nti_lightning.editing.blend import LocalBlend
from nti_lightning.editing.controllers import (
    AttentionController,
    Refine,
    Replace,
    Reweight,
)
from nti_lightning.editing.edit import edit, edit_latents
from nti_lightning.editing.editor import Editor, EditorSettings, EditRows
from nti_lightning.editing.editors import EDITOR_SETTINGS, EDITORS
from nti_lightning.editing.masactrl import MasaCtrl
from nti_lightning.editing.pictures import cross_attention_picture, token_attention_maps
from nti_lightning.editing.pix2pix_zero import Pix2PixZero
from nti_lightning.editing.plug_and_play import PlugAndPlay
from nti_lightning.inversion.compatible import check_compatible

__all__ = [
    "AttentionController",
    "AttentionLayer",
    "AttentionStore",
    "ControlledAttnProcessor",
    "EDITORS",
    "EDITOR_SETTINGS",
    "EditRows",
    "Editor",
    "EditorSettings",
    "LocalBlend",
    "MasaCtrl",
    "Pix2PixZero",
    "PlugAndPlay",
    "Refine",
    "Replace",
    "Reweight",
    "check_compatible",
    "controlled_attention",
    "cross_attention_picture",
    "edit",
    "edit_latents",
    "token_attention_maps",
]
