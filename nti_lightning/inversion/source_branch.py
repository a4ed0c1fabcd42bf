"""What an inversion adds to the source branch of an edit (Direct Inversion's offsets)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.sampling import StepCallback


def retrace_source(inversion: Inversion, prompts: Sequence[str], on_step: Optional[StepCallback]) -> Optional[StepCallback]:
    """Direct Inversion's step hook: after `on_step` (the controller's, LocalBlend included, as in
    the method's own code), the inversion's offset of the step is added to the rows of the
    source prompt, which then retrace the pivot; the other rows are left alone. `on_step`
    itself for an inversion without offsets."""
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
