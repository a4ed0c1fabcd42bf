"""`InversionMethod`: what sets one inversion method apart from the others, behind one interface.

Every method walks the same pivot trajectory from T to 1 with the same per-image step
(`nti_lightning.inversion.step`): its null condition is frozen, the latent takes one guided DDIM
step with it, and the step's results are recorded. A method decides only four things:

* where a step's null condition starts (`start_condition`): ∅, or the prompt's own condition;
* whether it has a per-step objective (`optimises`): Null-text tunes the null condition by Adam
  until the step lands on the pivot, the others freeze it as it starts;
* where the walk goes on after a step (`after_step`): from where the step landed, or back on the
  pivot (Direct Inversion, which then stores the offset it took);
* what it adds to the source branch of an edit (`source_hook`): nothing, or Direct Inversion's
  offsets, so that the source row retraces the pivot.

Both schedules (lockstep, `nti_lightning.inversion.trajectory`, and continuous,
`nti_lightning.inversion.slots`) ask the method object and never test its name. A new method is
one new file with an `InversionMethod` subclass, registered in `nti_lightning.inversion.methods`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.pivot import PivotTrajectory
from nti_lightning.inversion.sampling import SamplingRule, StepCallback


def is_number(value: Any) -> bool:
    """Whether a setting is a number (YAML's `true` is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """Whether a setting is a whole number >= 0 (YAML's `true` is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class InversionMethod:
    """One inversion method (a stateless object: the registry holds one of each).

    Attributes:
        name (`str`): the name in configs, artifacts and reports (`model.method`).
        label (`str`): how pages and tables name it.
        optimises (`bool`): whether each step tunes the null condition (Null-text's objective);
            without it every step takes one training batch and no Adam update.
        stores_offsets (`bool`): whether the artifact carries `latent_offsets` (what `after_step`
            returns besides the latent).
        stores_pivot (`bool`): whether the artifact carries `pivot_latents` (the pivot latent each
            step lands on: ProxNPI's edits are pulled towards them).
        stores_pair (`bool`): whether the artifact carries `coupled_latents` (EDICT's float64 pair
            at the step its edits start at, `PivotTrajectory.pair`).
        edits_under_control (`bool`): whether its edits take an editor's controller (EDICT's, as
            its authors' code edits, take none: a plain prompt swap).
        plain_sampling (`bool`): whether its edits sample by plain DDIM steps from z_T (its
            `sampling_rule` is the default one), which editors with loops of their own need.
        retraces_pivot (`bool`): whether an edit's source row, with what `source_hook` adds, goes
            back onto the pivot after every step (Direct Inversion), so that the pivot is that
            row's trajectory (what Plug-and-Play's source branch and Pix2Pix-Zero's reference pass follow).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    optimises: ClassVar[bool] = False
    stores_offsets: ClassVar[bool] = False
    stores_pivot: ClassVar[bool] = False
    stores_pair: ClassVar[bool] = False
    edits_under_control: ClassVar[bool] = True
    plain_sampling: ClassVar[bool] = True
    retraces_pivot: ClassVar[bool] = False
    #: The method's settings and their defaults (`model.method_options`); recorded in each artifact.
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = {**self.DEFAULTS, **options}

    def configured(
        self, options: Optional[Mapping[str, Any]], option: str = "model.method_options"
    ) -> "InversionMethod":
        """This method with `options` over its defaults, checked (`OptionError` naming `option` and
        the setting otherwise)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            known = ", ".join(self.DEFAULTS) or "none"
            raise OptionError(f"{option}: {self.name} has no setting {', '.join(unknown)} (its settings: {known})")
        method = copy.copy(self)
        method.options = {**self.DEFAULTS, **options}
        method.check(option)
        return method

    def check(self, option: str) -> None:
        """Raises `OptionError` naming `option` for a setting out of range (none to check here)."""

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
        """The trajectory the walk follows, when the method makes its own; `None` (the default)
        for the w = 1 DDIM inversion, computed once per image and shared by the methods.

        Args:
            unet (`UNet2DConditionModel`): the denoiser.
            schedule (`DDIMSchedule`): the schedule.
            z0 (`torch.Tensor`): `[B, C, h, w]` the images' VAE latents.
            cond (`Condition`): their B source-prompt conditions.
            empty (`Condition`, *optional*): ∅, one row (given by every schedule; None from a
                caller that has none, for which a method needing it raises `ValueError`).
            ids (`Sequence[str]`): the images' ids ("" for an empty slot).
        """
        return None

    @property
    def walks(self) -> bool:
        """Whether each step of the walk takes a guided step (False: the walk moves along the
        method's own trajectory, no UNet call, as EDICT's inversion is made whole beforehand)."""
        return True

    @property
    def eta(self) -> float:
        """The walk's and the edits' step: 0, DDIM; above, the mean of the stochastic step."""
        return 0.0

    def walk_guidance_scale(self, guidance_scale: float) -> float:
        """w of the walk's guided steps (by default the run's `guidance_scale`)."""
        return guidance_scale

    def start_step(self, num_inference_steps: int) -> int:
        """The step edits start at (0: from z_T); an artifact's `z_T` is the walk's latent there."""
        return 0

    def start_condition(self, cond: Condition, empty: Condition) -> Condition:
        """Where each step's null condition starts, one row per image.

        Args:
            cond (`Condition`): the images' source-prompt conditions C.
            empty (`Condition`): ∅, the pipeline's own unconditional input, one row.
        """
        return empty.expand(cond.batch)

    def after_step(self, stepped: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The latent the walk goes on from after a step, and the offset to store (or `None`).

        Args:
            stepped (`torch.Tensor`): `[B, C, h, w]` where the guided step with the frozen null landed.
            target (`torch.Tensor`): `[B, C, h, w]` the step's pivot latent.
        """
        return stepped, None

    def source_hook(
        self, inversion: Inversion, prompts: Sequence[str], on_step: Optional[StepCallback]
    ) -> Optional[StepCallback]:
        """The step hook of an edit of `inversion` with `prompts`: `on_step` (the editor's own),
        with whatever this method adds to the rows of the source prompt after it.

        Args:
            inversion (`Inversion`): the inversion being edited.
            prompts (`Sequence[str]`): the edit's prompts, one per row of the batch.
            on_step (`StepCallback`, *optional*): the editor's step hook.
        """
        return on_step

    def sampling_rule(self, inversion: Inversion, prompts: Sequence[str], guidance_scale: float) -> SamplingRule:
        """How an edit of `inversion` with `prompts` (one row each) samples its rows: by default all
        T DDIM steps with classifier-free guidance at `guidance_scale`.

        Args:
            inversion (`Inversion`): the inversion being edited.
            prompts (`Sequence[str]`): the edit's prompts, one per row.
            guidance_scale (`float`): the edit's w.
        """
        return SamplingRule()

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"{type(self).__name__}({settings})"
