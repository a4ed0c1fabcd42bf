"""ProxNPI: negative-prompt inversion with proximal guidance (Han et al., "Improving Tuning-Free Real
Image Editing with Proximal Guidance", 2023; phymhan/prompt-to-prompt `ptp_utils.diffusion_step`,
the same code as PnP Inversion's `proximal_guidance_forward.py`).

The inversion is negative-prompt inversion's (the source prompt's own condition as every step's
null, no optimisation), and the artifact also keeps the pivot: the latent each step lands on.
An edit changes two things of the sampling, per edit (the rows of one inversion together):

* guidance: the difference `δ = ε_c - ε_u` is shrunk at a threshold, the `quantile` of |δ| over
  every element of the edit's rows (one number for the edit, its source row's zeros included):
  `"l0"` is `δ - clamp(δ, ±th)` (zero below the threshold, the rest moved towards zero by it);
  `"l1"` then shifts once more as the authors' code does (which turns `(-2th, -th)` positive);
  the step is guided by `ε_u + w δ'`;
* inversion guidance: for timesteps below `recon_t` (strictly), a mask marks where the shrunk
  difference is above the threshold, grown by a `2 dilate_mask + 1` max-pool per row and
  channel; after the step every row is pulled towards the pivot latent the step lands on outside
  that mask, `x -= recon_lr (x - x*) (1 - mask)` (before Prompt-to-Prompt's end of step).

Settings (`model.method_options`, the authors' defaults, which PnP Inversion's `run_editing_p2p.py`
passes too): `prox` "l0", `quantile` 0.75, `recon_t` 400, `recon_lr` 1.0, `dilate_mask` 1 and
`inversion_guidance` true. PnP Inversion's own editor never forwards `inversion_guidance` to its
sampler, so its published ProxNPI row ran with the thresholding alone: `inversion_guidance: false`
reproduces that row; eta-inversion's ProxNPI is the same.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from nti_lightning.diffusion.condition import Condition
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods.base import InversionMethod, is_count, is_number
from nti_lightning.inversion.sampling import SamplingRule

PROXES = ("l0", "l1")


def proximal(delta: torch.Tensor, prox: str, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk guidance difference and the threshold: the `quantile` of |δ| over all of `delta`.

    Args:
        delta (`torch.Tensor`): `[P, C, h, w]` conditional minus unconditional outputs of one edit.
        prox (`str`): "l0" or "l1" (see the module's docstring).
        quantile (`float`): in (0, 1].
    """
    threshold = delta.abs().float().quantile(quantile)
    shrunk = delta - delta.clamp(-threshold, threshold)
    if prox == "l1":  # the authors' two shifts, in their order
        shrunk = torch.where(shrunk > 0, shrunk - threshold, shrunk)
        shrunk = torch.where(shrunk < 0, shrunk + threshold, shrunk)
    return shrunk, threshold


class ProxNpi(InversionMethod):
    name = "proxnpi"
    plain_sampling = False
    label = "ProxNPI"
    stores_pivot = True
    DEFAULTS = {
        "prox": "l0", "quantile": 0.75, "recon_t": 400, "recon_lr": 1.0, "dilate_mask": 1, "inversion_guidance": True,
    }

    def check(self, option: str) -> None:
        o = self.options

        if o["prox"] not in PROXES:
            raise OptionError(f"{option}.prox must be one of {PROXES}, got {o['prox']!r}")
        if not is_number(o["quantile"]) or not 0 < o["quantile"] <= 1:
            raise OptionError(f"{option}.quantile must be in (0, 1], got {o['quantile']!r}")
        if not is_number(o["recon_t"]) or not 0 <= o["recon_t"] <= 1000:
            raise OptionError(f"{option}.recon_t must be a timestep in [0, 1000] (0: no pull), got {o['recon_t']!r}")
        if not is_number(o["recon_lr"]) or not 0 <= o["recon_lr"] <= 1:
            raise OptionError(f"{option}.recon_lr must be in [0, 1], got {o['recon_lr']!r}")
        if not is_count(o["dilate_mask"]):
            raise OptionError(f"{option}.dilate_mask must be a whole number >= 0, got {o['dilate_mask']!r}")
        if not isinstance(o["inversion_guidance"], bool):
            raise OptionError(f"{option}.inversion_guidance must be true or false, got {o['inversion_guidance']!r}")

    def start_condition(self, cond: Condition, empty: Condition) -> Condition:
        return cond  # negative-prompt inversion

    def sampling_rule(self, inversion: Inversion, prompts: Sequence[str], guidance_scale: float) -> SamplingRule:
        if inversion.pivot_latents is None:
            raise ValueError("a ProxNPI inversion needs its pivot latents; this one has none")
        o = self.options
        pull = o["inversion_guidance"] and o["recon_lr"] > 0
        masks: dict[int, torch.Tensor] = {}  # the step's mask, from its guidance to its end

        def guide(step: int, timestep: int, uncond: torch.Tensor, cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            shrunk, threshold = proximal(cond - uncond, o["prox"], float(o["quantile"]))
            masks.clear()
            if pull and timestep < o["recon_t"]:
                mask = (shrunk.abs() > threshold).float()
                if o["dilate_mask"] > 0:
                    r = int(o["dilate_mask"])
                    mask = F.max_pool2d(mask, 2 * r + 1, 1, r)
                masks[step] = mask
            return uncond + w * shrunk

        def pull_back(step: int, latents: torch.Tensor) -> torch.Tensor:
            mask = masks.pop(step, None)
            if mask is None:
                return latents
            target = inversion.pivot_latents[step].to(latents.device, latents.dtype)
            return latents - float(o["recon_lr"]) * (latents - target) * (1 - mask)

        return SamplingRule(guide=guide, finish_step=pull_back)

