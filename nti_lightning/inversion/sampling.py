"""Step 3 of Null-text Inversion: sampling from `z_T` with a null embedding per step.

The same loop reconstructs an image (source prompt), edits it (other prompts), and gives the
baselines: plain DDIM (the `""` embedding at every step) and negative-prompt inversion (the
prompt embedding itself as the unconditional input).

An inversion method that samples otherwise says how in a `SamplingRule` (its
`InversionMethod.sampling_rule`): where to start, the stochastic step's mean, a w per row, its
own guidance, an end of step before the editor's hook, or EDICT's coupled pair.
`combined_rule` makes one rule of several edits' rules for one batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.diffusion.edict import coupled_step
from nti_lightning.diffusion.guidance import guide, guided_step, predict

#: Called after every step with (step index, timestep, new latents); may return replacement latents.
#: The index counts the steps the sampler takes (0 for the first, whatever `SamplingRule.start` is).
StepCallback = Callable[[int, int, torch.Tensor], torch.Tensor | None]
#: A method's own guidance: (step, timestep, unconditional output, conditional output, `[B, 1, 1, 1]` w)
#: -> guided output.
GuideFunction = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplingRule:
    """How an inversion method samples its rows, beyond the prompts and the per-step nulls.

    Args:
        start (`int`, defaults to 0): the first step taken: the sampler starts from the inversion's
            latent at that step (edit-friendly DDPM skips the first steps).
        eta (`float`, defaults to 0.0): 0, the DDIM step; above it the deterministic part of the
            stochastic step (`nti_lightning.diffusion.ddim.prev_step`), to which `finish_step`
            adds the noise.
        guidance_scales (`torch.Tensor`, *optional*): `[B]` w of each row (by default the sampler's
            `guidance_scale` for all).
        finish_step (`Callable[[int, torch.Tensor], torch.Tensor]`, *optional*): (step, `[B, C, h, w]`
            latents the step landed on) -> the step's result, before any hook; its step counted
            over all T steps (0 = the noisiest): edit-friendly DDPM adds its noise maps, ProxNPI
            pulls the latents towards the inversion's outside the edited region.
        guide (`GuideFunction`, *optional*): replaces classifier-free guidance (ProxNPI's
            thresholded guidance); its step is counted over all T steps.
        pair (`torch.Tensor`, *optional*): `[2, B, C, h, w]` float64: EDICT's coupled sampling
            from this latent pair (`nti_lightning.diffusion.edict`), which returns its x.
        mix_weight (`float`, defaults to 0.93): EDICT's p.
    """

    start: int = 0
    eta: float = 0.0
    guidance_scales: Optional[torch.Tensor] = None
    finish_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None
    guide: Optional[GuideFunction] = None
    pair: Optional[torch.Tensor] = None
    mix_weight: float = 0.93

    @property
    def is_plain(self) -> bool:
        """Whether it is the default: all T DDIM steps with classifier-free guidance at one w."""
        no_hooks = self.guidance_scales is None and self.finish_step is None and self.guide is None
        return no_hooks and self.start == 0 and self.eta == 0 and self.pair is None

    @property
    def kind(self) -> tuple[Any, ...]:
        """What rows must share to be sampled in one batch: the start, the step, EDICT's p."""
        return (self.start, self.eta, None if self.pair is None else self.mix_weight)


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    schedule: DDIMSchedule,
    z_T: torch.Tensor,
    nulls: Sequence[Condition],
    cond: Condition,
    guidance_scale: float = 7.5,
    on_step: StepCallback | None = None,
    rule: SamplingRule | None = None,
) -> torch.Tensor:
    """Guided DDIM sampling from `z_T`, with `nulls[i]` as the unconditional input of step i.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        schedule (`DDIMSchedule`): the schedule the inversion used (same T).
        z_T (`torch.Tensor`): `[B, C, h, w]` starting latents (or `[1, C, h, w]`, broadcast): at
            T, or at the rule's start step.
        nulls (`Sequence[Condition]`): T per-step unconditional conditions of B rows, or of one
            row (broadcast to every prompt of the batch).
        cond (`Condition`): the B prompt conditions.
        guidance_scale (`float`, defaults to 7.5): w.
        on_step (`StepCallback`, *optional*): hook after each step (Prompt-to-Prompt's LocalBlend).
        rule (`SamplingRule`, *optional*): the inversion method's start step, step and guidance
            (by default all T DDIM steps with classifier-free guidance).

    Returns:
        `[B, C, h, w]` fp32 latents at t = 0.
    """
    if len(nulls) != schedule.num_inference_steps:
        raise ValueError(f"{len(nulls)} null conditions for {schedule.num_inference_steps} sampling steps")
    rule = rule if rule is not None else SamplingRule()
    if not 0 <= rule.start < schedule.num_inference_steps:
        raise ValueError(f"sampling cannot start at step {rule.start} of {schedule.num_inference_steps}")
    if rule.pair is not None:
        return _coupled_sample(unet, schedule, nulls, cond, guidance_scale, on_step, rule)
    latents = z_T.float().expand(cond.batch, -1, -1, -1)
    # w: the sampler's, or one per row; a method's own guidance always gets one per row.
    w: float | torch.Tensor = guidance_scale
    if rule.guidance_scales is not None:
        w = rule.guidance_scales.to(latents.device).view(-1, 1, 1, 1)
    elif rule.guide is not None:
        w = torch.full((cond.batch, 1, 1, 1), guidance_scale, device=latents.device)
    for step, timestep in enumerate(schedule.timesteps.tolist()):
        if step < rule.start:
            continue
        uncond = nulls[step].to(dtype=cond.embeddings.dtype)
        combine = None
        if rule.guide is not None:
            combine = functools.partial(_guided_by, rule.guide, step, timestep, w)
        latents = guided_step(schedule, unet, latents, timestep, uncond, cond, w, eta=rule.eta, combine=combine)
        if rule.finish_step is not None:
            latents = rule.finish_step(step, latents)
        if on_step is not None:
            replaced = on_step(step - rule.start, timestep, latents)
            latents = latents if replaced is None else replaced
    return latents


def coupled_noise(
    unet: UNet2DConditionModel, uncond: Condition, cond: Condition, guidance_scales: torch.Tensor
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """EDICT's noise prediction of a float64 latent: both branches in one UNet call (in the UNet's
    dtype), guided in float64 with each row's w.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        uncond (`Condition`): B unconditional conditions.
        cond (`Condition`): B prompt conditions.
        guidance_scales (`torch.Tensor`): `[B]` w of each row.
    """
    both_conditions = Condition.cat([uncond, cond])

    def eps(latent: torch.Tensor, timestep: int) -> torch.Tensor:
        both = predict(unet, torch.cat([latent, latent]), timestep, both_conditions).double()
        uncond_output, cond_output = both.chunk(2)
        w = guidance_scales.to(latent.device, torch.float64).view(-1, 1, 1, 1)
        return uncond_output + w * (cond_output - uncond_output)

    return eps


def _coupled_sample(
    unet: UNet2DConditionModel,
    schedule: DDIMSchedule,
    nulls: Sequence[Condition],
    cond: Condition,
    guidance_scale: float,
    on_step: StepCallback | None,
    rule: SamplingRule,
) -> torch.Tensor:
    """EDICT's sampling of `rule.pair` from `rule.start`: x, as fp32. A step hook sees x and may
    not change it (the pair could not follow)."""
    rows = cond.batch
    scales = rule.guidance_scales if rule.guidance_scales is not None else torch.full((rows,), guidance_scale)
    device = cond.embeddings.device
    pair = (rule.pair[0].to(device, torch.float64), rule.pair[1].to(device, torch.float64))
    for step, timestep in enumerate(schedule.timesteps.tolist()):
        if step < rule.start:
            continue
        uncond = nulls[step].to(dtype=cond.embeddings.dtype).expand(rows)
        eps = coupled_noise(unet, uncond, cond, scales)
        pair = coupled_step(schedule, pair, timestep, (step - rule.start) % 2, eps, rule.mix_weight, reverse=False)
        if on_step is not None:
            x = pair[0].float()
            replaced = on_step(step - rule.start, timestep, x)
            if replaced is not None and replaced is not x and not torch.equal(replaced, x):
                raise ValueError("EDICT's coupled sampling cannot take a step hook that changes the latents")
    return pair[0].float()


def _guided_by(
    own: GuideFunction, step: int, timestep: int, w: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """A method's guidance function at one step, as `guided_step`'s `combine`."""
    return own(step, timestep, uncond, cond, w)


def combined_rule(rules: Sequence[SamplingRule], sizes: Sequence[int], guidance_scale: float) -> SamplingRule:
    """One rule for a batch of jobs, each with its rule over its `sizes[k]` rows; all must start at
    the same step with the same kind of step (`edit_jobs_latents` groups them so).

    Args:
        rules (`Sequence[SamplingRule]`): each job's rule.
        sizes (`Sequence[int]`): each job's rows.
        guidance_scale (`float`): w of the rows whose rule sets none.
    """
    if len({rule.kind for rule in rules}) > 1:
        raise ValueError("jobs sampled together need one start step and one kind of step")
    if len(rules) == 1:
        return rules[0]
    first = rules[0]
    scales = None
    if any(rule.guidance_scales is not None for rule in rules):
        scales = torch.cat([
            rule.guidance_scales.float() if rule.guidance_scales is not None else torch.full((size,), guidance_scale)
            for rule, size in zip(rules, sizes)
        ])
    finish = None
    if any(rule.finish_step is not None for rule in rules):
        finishes = [rule.finish_step for rule in rules]

        def finish(step: int, latents: torch.Tensor) -> torch.Tensor:
            parts = zip(finishes, latents.split(list(sizes)))
            return torch.cat([own(step, part) if own is not None else part for own, part in parts])

    guide_function = None
    if any(rule.guide is not None for rule in rules):
        guides = [rule.guide for rule in rules]

        def guide_function(
            step: int, timestep: int, uncond: torch.Tensor, cond: torch.Tensor, w: torch.Tensor
        ) -> torch.Tensor:
            rows = list(sizes)
            parts = zip(guides, uncond.split(rows), cond.split(rows), w.split(rows))
            return torch.cat(
                [own(step, timestep, u, c, s) if own is not None else guide(u, c, s) for own, u, c, s in parts]
            )

    pair = None
    if first.pair is not None:
        pair = torch.cat([rule.pair.double() for rule in rules], dim=1)
    return SamplingRule(first.start, first.eta, scales, finish, guide_function, pair, first.mix_weight)
