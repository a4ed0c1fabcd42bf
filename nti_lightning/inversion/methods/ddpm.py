"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024; inbarhub/DDPM_inversion).

The walk's trajectory is not a DDIM inversion: each x_t is drawn independently from the image,
`x_t = sqrt(ā_t) z0 + sqrt(1 - ā_t) n_t` (`sample_xts_from_x0`). Walking it from T down, each
step takes the stochastic (η = 1) step's mean from x_t under the source prompt at the source w
(`source_guidance_scale`, 1 in PnP Inversion's benchmark) and stores the noise term that lands on
x_{t-1}, `σ_t z_t = x_{t-1} - mean` (`inversion_forward_process`, whose "correction" the walk
keeps: it goes on from `mean + σ_t z_t`). Storing `σ_t z_t` is storing the authors' z_t.

An edit starts `skip` steps in, from the walk's latent there (the artifact's `z_T`), and takes
the stochastic steps with the stored noise terms added to every row (`inversion_reverse_process`):
rows with the source prompt at the source w, the others at the edit's w. With every map kept the
source prompt gives back z0 to float rounding; the authors zero the last map (their `zs[0] = 0`),
which `keep_last_map: false` reproduces.

Settings (`model.method_options`): `skip` (default: 12 of 50 steps, scaled to T and rounded),
`eta` (1.0), `source_guidance_scale` (1.0), `seed` (0: image i's noise comes from a CPU generator
seeded with `seed` and its id, the same on every device and in any batch) and `keep_last_map` (True).
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.ddpm import image_noises, noised_trajectory
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods.base import InversionMethod, is_count, is_number
from nti_lightning.inversion.pivot import PivotTrajectory
from nti_lightning.inversion.sampling import SamplingRule

#: PnP Inversion's benchmark skips 12 of its 50 steps.
BENCHMARK_SKIP, BENCHMARK_STEPS = 12, 50


def image_seed(seed: int, image_id: str) -> int:
    """The noise seed of image `image_id`: `seed` and the id's CRC-32, so that an image's noise
    depends on nothing else (not its batch, rank or order)."""
    return (int(seed) * 2**32 + zlib.crc32(image_id.encode("utf-8"))) % 2**63


class Ddpm(InversionMethod):
    name = "ddpm"
    plain_sampling = False
    label = "edit-friendly DDPM"
    stores_offsets = True
    DEFAULTS = {"skip": None, "eta": 1.0, "source_guidance_scale": 1.0, "seed": 0, "keep_last_map": True}

    def check(self, option: str) -> None:
        skip, eta, w, seed = (self.options[key] for key in ("skip", "eta", "source_guidance_scale", "seed"))
        if skip is not None and not is_count(skip):
            raise OptionError(f"{option}.skip must be a whole number of steps >= 0, got {skip!r}")
        if not is_number(eta) or not 0 < eta <= 1:
            raise OptionError(f"{option}.eta must be in (0, 1] (the maps need a noise term), got {eta!r}")
        if not is_number(w) or w < 0:
            raise OptionError(f"{option}.source_guidance_scale must be a number >= 0, got {w!r}")
        if not is_count(seed):
            raise OptionError(f"{option}.seed must be a whole number >= 0, got {seed!r}")
        if not isinstance(self.options["keep_last_map"], bool):
            raise OptionError(f"{option}.keep_last_map must be true or false, got {self.options['keep_last_map']!r}")

    # ----------------------------------------------------------------------- the walk
    def walk_pivot(
        self,
        unet: UNet2DConditionModel,
        schedule: DDIMSchedule,
        z0: torch.Tensor,
        cond: Condition,
        empty: Optional[Condition],
        ids: Sequence[str],
    ) -> Optional[PivotTrajectory]:
        steps = schedule.num_inference_steps
        noises = [image_noises(z0.shape[1:], steps, image_seed(self.options["seed"], id_)) for id_ in ids]
        per_step = [torch.stack([noise[k] for noise in noises]) for k in range(steps)]
        return PivotTrajectory(latents=noised_trajectory(schedule, z0, per_step), timesteps=schedule.timesteps.clone())

    @property
    def eta(self) -> float:
        return float(self.options["eta"])

    def walk_guidance_scale(self, guidance_scale: float) -> float:
        return float(self.options["source_guidance_scale"])

    def after_step(self, stepped: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        noise = target - stepped  # σ_t z_t
        return stepped + noise, noise  # the authors' "correction": on from mean + σ_t z_t

    def start_step(self, num_inference_steps: int) -> int:
        skip = self.options["skip"]
        if skip is None:
            return round(BENCHMARK_SKIP * num_inference_steps / BENCHMARK_STEPS)
        if skip >= num_inference_steps:
            raise OptionError(f"model.method_options.skip must be below the {num_inference_steps} steps, got {skip}")
        return skip

    # ----------------------------------------------------------------------- the edits
    def sampling_rule(self, inversion: Inversion, prompts: Sequence[str], guidance_scale: float) -> SamplingRule:
        if inversion.latent_offsets is None:
            raise ValueError("an edit-friendly DDPM inversion needs its noise maps (latent_offsets); this one has none")
        source_w = float(self.options["source_guidance_scale"])
        scales = torch.tensor([source_w if prompt == inversion.prompt else guidance_scale for prompt in prompts])
        offsets, last = inversion.latent_offsets, inversion.num_inference_steps - 1
        keep_last = self.options["keep_last_map"]

        def add_noise(step: int, latents: torch.Tensor) -> torch.Tensor:
            if step == last and not keep_last:
                return latents  # the authors' zeroed last map
            return latents + offsets[step].to(latents.device, latents.dtype)  # the same map on every row

        return SamplingRule(
            start=self.start_step(inversion.num_inference_steps), eta=self.eta, guidance_scales=scales,
            finish_step=add_noise,
        )
