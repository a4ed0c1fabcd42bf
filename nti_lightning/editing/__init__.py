"""Prompt-to-Prompt editing of inverted images: attention control, controllers, editors, `edit`, the predict CLI."""

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
from nti_lightning.editing.editor import Editor, EditRows
from nti_lightning.editing.pictures import cross_attention_picture, token_attention_maps
from nti_lightning.inversion.compatible import check_compatible

__all__ = [
    "AttentionController",
    "AttentionLayer",
    "AttentionStore",
    "ControlledAttnProcessor",
    "EditRows",
    "Editor",
    "LocalBlend",
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
