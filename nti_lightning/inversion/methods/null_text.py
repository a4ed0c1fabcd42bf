"""Null-text Inversion (Mokady et al. 2022), the paper: each step's null condition starts at ∅
and is tuned by Adam until the guided step lands on the pivot (`nti_lightning.inversion.null_text`)."""

from __future__ import annotations

from nti_lightning.inversion.methods.base import InversionMethod


class NullText(InversionMethod):
    name = "null_text"
    label = "Null-text"
    optimises = True
