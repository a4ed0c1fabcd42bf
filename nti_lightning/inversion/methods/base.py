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

from typing import ClassVar, Optional, Sequence

import torch

from nti_lightning.diffusion.condition import Condition
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.sampling import StepCallback


class InversionMethod:
    """One inversion method (a stateless object: the registry holds one of each).

    Attributes:
        name (`str`): the name in configs, artifacts and reports (`model.method`).
        label (`str`): how pages and tables name it.
        optimises (`bool`): whether each step tunes the null condition (Null-text's objective);
            without it every step takes one training batch and no Adam update.
        stores_offsets (`bool`): whether the artifact carries `latent_offsets` (what `after_step`
            returns besides the latent).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    optimises: ClassVar[bool] = False
    stores_offsets: ClassVar[bool] = False

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
