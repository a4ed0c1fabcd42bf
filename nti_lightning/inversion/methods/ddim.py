"""DDIM inversion alone: the pivot's z_T, sampled back with ∅ at every step (the paper's baseline)."""

from __future__ import annotations

from nti_lightning.inversion.methods.base import InversionMethod


class Ddim(InversionMethod):
    name = "ddim"
    label = "DDIM"
