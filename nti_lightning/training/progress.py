"""`InversionProgressBar`: images done out of the whole run, and the timestep being optimised.

Lightning's own bar counts epochs and batches, which here are timesteps and inner iterations;
a user inverting a dataset wants "how many images are done". The count covers all ranks without
any communication: ranks walk their batches in lockstep (Lightning synchronises them at every
batch), so when rank 0 has finished k batches every rank has, and the plan says how many
images those are.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class InversionProgressBar(TQDMProgressBar):
    """A tqdm bar of images done / total with the current step, timestep and inner iteration."""

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # The module brings this bar along; drop the Trainer's default one (tqdm or rich) so
        # that a single bar is drawn.
        trainer.callbacks = [c for c in trainer.callbacks if c is self or not isinstance(c, ProgressBar)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.set_description("images", refresh=False)
        self.train_progress_bar.reset(total=_plan(trainer).num_images if _plan(trainer) else None)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one epoch is one timestep, not a unit of progress

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.train_progress_bar.disable or pl_module.schedule is None:
            return
        if "tick" in batch:  # continuous batching: slots at their own steps
            walk = pl_module.slot_walk
            busy = [s for s, image in enumerate(walk.images) if image is not None]
            self.train_progress_bar.set_postfix(
                slots=f"{len(busy)}/{walk.slots}",
                steps=",".join(str(int(walk.step[s]) + 1) for s in busy) or "-",
                refresh=False,
            )
            # Images done over all ranks, as last agreed (the ranks count theirs together every
            # `sync_every` batches); this rank's own count in between.
            self.train_progress_bar.n = max(pl_module.images_done_all, pl_module.images_done)
            self.train_progress_bar.refresh()
            return
        step = batch["step"]
        self.train_progress_bar.set_postfix(
            step=f"{step + 1}/{pl_module.hparams.num_inference_steps}",
            t=int(pl_module.schedule.timesteps[step]),
            iteration=batch["iteration"] + 1,
            refresh=False,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        plan = _plan(trainer)
        if plan is None or self.train_progress_bar.disable or pl_module.continuous:
            return  # continuous batching counts images as they finish (on_train_batch_end)
        batches_finished = (trainer.current_epoch + 1) // pl_module.hparams.num_inference_steps
        self.train_progress_bar.n = plan.images_done(batches_finished)
        self.train_progress_bar.refresh()


def _plan(trainer: pl.Trainer) -> Any:
    return getattr(getattr(trainer, "datamodule", None), "plan", None)
