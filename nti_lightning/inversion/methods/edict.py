"""EDICT (Wallace et al., "EDICT: Exact Diffusion Inversion via Coupled Transformations", CVPR 2023;
salesforce/EDICT `edict_functions.py`).

Two coupled latent sequences, exactly invertible (`nti_lightning.diffusion.edict`): the inversion
undoes EDICT's denoising steps from the pair (z0, z0) up to the step its edits start at
(`strength` of the trajectory: the lowest `int(T · strength)` timesteps, as the authors'
`t_limit`), with the source prompt at the method's own w. The walk then has nothing to optimise
or to step: it moves along the inversion's x (no UNet call), and the artifact keeps the float64
pair where the edits start (`coupled_latents`; `z_T` is its x in float32). An edit samples the
pair back with EDICT's steps from there, every row at the method's w, and decodes x, as the
authors' `EDICT_editing` does: with the source prompt it returns z0 to float64 rounding. EDICT
edits without Prompt-to-Prompt (its authors' own editing); a controller is refused by name.

Settings (`model.method_options`, `EDICT_editing`'s defaults): `guidance_scale` 3.0 (of the
inversion and of every edit of it), `strength` 0.8 and `mix_weight` p = 0.93. The authors'
reconstruction defaults are w = 7 and strength 1.0. Timesteps are the pipeline's (981 ... 1 at
T = 50, the scheduler's `steps_offset`); the authors' own scheduler runs 980 ... 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.edict import coupled_step
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods.base import InversionMethod, is_number
from nti_lightning.inversion.pivot import PivotTrajectory
from nti_lightning.inversion.sampling import SamplingRule, coupled_noise


class Edict(InversionMethod):
    name = "edict"
    plain_sampling = False
    label = "EDICT"
    stores_pair = True
    edits_under_control = False
    DEFAULTS = {"guidance_scale": 3.0, "strength": 0.8, "mix_weight": 0.93}

    def check(self, option: str) -> None:
        w, strength, p = (self.options[key] for key in ("guidance_scale", "strength", "mix_weight"))
        if not is_number(w) or w < 0:
            raise OptionError(f"{option}.guidance_scale must be a number >= 0, got {w!r}")
        if not is_number(strength) or not 0 < strength <= 1:
            raise OptionError(f"{option}.strength must be in (0, 1], got {strength!r}")
        if not is_number(p) or not 0 < p < 1:
            raise OptionError(f"{option}.mix_weight must be in (0, 1) (its mixing must be undone), got {p!r}")

    @property
    def walks(self) -> bool:
        return False

    def start_step(self, num_inference_steps: int) -> int:
        start = num_inference_steps - int(num_inference_steps * float(self.options["strength"]))
        if start >= num_inference_steps:
            raise OptionError(
                f"model.method_options.strength {self.options['strength']} leaves none of the "
                f"{num_inference_steps} steps"
            )
        return start

    @torch.no_grad()
    def walk_pivot(
        self,
        unet: UNet2DConditionModel,
        schedule: DDIMSchedule,
        z0: torch.Tensor,
        cond: Condition,
        empty: Optional[Condition],
        ids: Sequence[str],
    ) -> Optional[PivotTrajectory]:
        if empty is None:
            raise ValueError("EDICT's inversion needs the pipeline's unconditional condition ∅")
        steps, start = schedule.num_inference_steps, self.start_step(schedule.num_inference_steps)
        w = torch.full((z0.shape[0],), float(self.options["guidance_scale"]))
        eps = coupled_noise(unet, empty.expand(z0.shape[0]), cond, w)
        pair = (z0.double(), z0.double())
        latents: list[Optional[torch.Tensor]] = [None] * (steps + 1)
        latents[0] = z0.float()
        timesteps = schedule.timesteps.tolist()
        # Sampling step i (from timesteps[i]) starts at latents[T - i]: undo them from the last.
        for step in reversed(range(start, steps)):
            pair = coupled_step(
                schedule, pair, timesteps[step], (step - start) % 2, eps, float(self.options["mix_weight"]),
                reverse=True,
            )
            latents[steps - step] = pair[0].float()
        for step in range(start):  # the steps edits skip: the walk stays where they start
            latents[steps - step] = latents[steps - start]
        return PivotTrajectory(
            latents=torch.stack(latents), timesteps=schedule.timesteps.clone(), pair=torch.stack(pair)
        )

    def sampling_rule(self, inversion: Inversion, prompts: Sequence[str], guidance_scale: float) -> SamplingRule:
        if inversion.coupled_latents is None:
            raise ValueError("an EDICT inversion needs its coupled latents; this one has none")
        rows = len(prompts)
        return SamplingRule(
            start=self.start_step(inversion.num_inference_steps),
            guidance_scales=torch.full((rows,), float(self.options["guidance_scale"])),
            pair=inversion.coupled_latents.double().unsqueeze(1).expand(-1, rows, -1, -1, -1),
            mix_weight=float(self.options["mix_weight"]),
        )
