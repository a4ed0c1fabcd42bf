"""Negative-prompt inversion (Miyake et al. 2023): the source prompt's own condition stands in for
the null one at every step, no optimisation (guidance then cancels and the step is the pivot's)."""

from __future__ import annotations

from nti_lightning.diffusion.condition import Condition
from nti_lightning.inversion.methods.base import InversionMethod


class NegativePrompt(InversionMethod):
    name = "negative_prompt"
    label = "negative prompt"

    def start_condition(self, cond: Condition, empty: Condition) -> Condition:
        return cond
