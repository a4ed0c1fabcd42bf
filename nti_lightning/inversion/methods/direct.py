"""Direct Inversion (Ju et al. 2024, PnP Inversion): the pivot with ∅, and per step the offset
`z*_{t-1} - step(z*_t)` from where the guided step landed to the pivot's next latent. The walk goes
on from the pivot; an edit adds each step's offset to its source row, which so retraces the pivot
while the target rows are left alone."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods.base import InversionMethod
from nti_lightning.inversion.sampling import StepCallback


class Direct(InversionMethod):
    name = "direct"
    label = "Direct Inversion"
    stores_offsets = True
    retraces_pivot = True

    def after_step(self, stepped: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Back onto the pivot, remembering the way.
        return target.clone(), target - stepped

    def source_hook(
        self, inversion: Inversion, prompts: Sequence[str], on_step: Optional[StepCallback]
    ) -> Optional[StepCallback]:
        """After `on_step` (the controller's, LocalBlend included, as in the method's own code),
        the inversion's offset of the step is added to the rows of the source prompt; the other
        rows are left alone. `on_step` itself for an inversion without offsets."""
        if inversion.latent_offsets is None:
            return on_step
        source = torch.tensor([prompt == inversion.prompt for prompt in prompts], dtype=torch.float32)
        if not bool(source.any()):
            return on_step
        offsets = inversion.latent_offsets

        def step_hook(step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor:
            replaced = on_step(step, timestep, latents) if on_step is not None else None
            latents = latents if replaced is None else replaced
            rows = source.to(latents.device).view(-1, 1, 1, 1)
            return latents + rows * offsets[step].to(latents.device, latents.dtype)

        return step_hook
