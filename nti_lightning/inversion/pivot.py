"""Step 1 of Null-text Inversion: the pivot, a DDIM inversion with guidance w = 1.

`PivotTrajectory` keeps all T+1 latents of the inversion. Walked backwards (from T to 1) it is
the sequence of targets of the null-text optimisation, which is why it is also a `Dataset`: item
`i` is the i-th denoising step of the walk, the timestep it starts at and the latent it must hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers import UNet2DConditionModel
from torch.utils.data import Dataset

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule, next_step
from nti_lightning.diffusion.guidance import predict


@dataclass
class PivotTrajectory(Dataset):
    """The DDIM-inversion trajectory of a batch of images.

    Args:
        latents (`torch.Tensor`): `[T + 1, B, C, h, w]`, fp32; `latents[0]` is `z0` (the VAE
            latent), `latents[T]` is `z_T`.
        timesteps (`torch.Tensor`): the T inference timesteps, descending.
        pair (`torch.Tensor`, *optional*): `[2, B, C, h, w]` float64, EDICT's coupled latents at
            the step its edits start at (`nti_lightning.inversion.methods.edict`).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    pair: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, step: int) -> dict[str, Any]:
        """Step `step` of the walk from T to 1: denoise at `timesteps[step]` towards `latents[T-1-step]`."""
        if not 0 <= step < len(self):
            raise IndexError(step)
        return {"step": step, "timestep": int(self.timesteps[step]), "target": self.latents[len(self) - 1 - step]}

    def rows(self, start: int, end: int) -> "PivotTrajectory":
        """The images `start` to `end` (exclusive) of the batch, as a trajectory of their own."""
        pair = None if self.pair is None else self.pair[:, start:end].clone()
        return PivotTrajectory(latents=self.latents[:, start:end].clone(), timesteps=self.timesteps, pair=pair)

    @property
    def z_T(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def z0(self) -> torch.Tensor:
        return self.latents[0]


@torch.no_grad()
def ddim_invert(
    unet: UNet2DConditionModel, schedule: DDIMSchedule, z0: torch.Tensor, cond: Condition
) -> PivotTrajectory:
    """DDIM inversion with the conditional branch only (w = 1), keeping every latent.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        schedule (`DDIMSchedule`): the DDIM schedule; its timesteps are walked in ascending order.
        z0 (`torch.Tensor`): `[B, C, h, w]` VAE latents of the images.
        cond (`Condition`): the B source-prompt conditions.
    """
    latent = z0.float()
    latents = [latent]
    for timestep in schedule.timesteps.flip(0).tolist():
        output = predict(unet, latent, timestep, cond)
        latent = next_step(schedule, output, timestep, latent)
        latents.append(latent)
    return PivotTrajectory(latents=torch.stack(latents), timesteps=schedule.timesteps.clone())
