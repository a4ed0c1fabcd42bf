"""`SlotWalkCallback`: the slot boundaries of continuous batching (`scheduling="continuous"`).

`NullTextInversion.training_step` is one inner Adam iteration of every slot still optimising,
each at its own timestep. Everything between iterations is here, on the `SlotWalk`
(`nti_lightning.inversion.slots`):

* before a batch: free slots take the next images of this rank. When none is waiting, up to S
  of them are decoded, encoded and their pivots computed together, then queued; the free slots
  take them from the queue, the others as slots free up later;
* after a batch: the slots whose step is over freeze their null condition and take their guided
  DDIM advance together, then start their next step; images that finished their last step are
  written (artifact, metrics, grid, TensorBoard, report row) exactly as in lockstep scheduling.

The run ends when no image is left (`NullTextInversion` ends the epoch; under DDP once every
rank agrees). Timestep metrics are logged per advance: the mean loss and inner iterations of the
slots that advanced together.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from nti_lightning.diffusion.condition import Condition
from nti_lightning.inversion.slots import SlotImage, SlotWalk
from nti_lightning.models import vae as vae_codec
from nti_lightning.training.callback import NullTextWalkCallback, _metadata


class SlotWalkCallback(NullTextWalkCallback):
    """Drives `NullTextInversion` under continuous batching (added by the module itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.advances = 0  # advance events so far: the x axis of the timestep metrics

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.fit_loop.max_epochs = 1  # one epoch: the stream of UNet calls until all is done
        hparams = pl_module.hparams
        pl_module.empty = pl_module.prompt_encoder.null().to(pl_module.device)
        pl_module.slot_walk = SlotWalk(
            pl_module.schedule,
            pl_module.null_parameters(),
            pl_module.empty,
            hparams.guidance_scale,
            hparams.num_inner_steps,
            hparams.early_stop_epsilon,
            hparams.learning_rate,
            method=pl_module.method,
            reuse_cond_output=hparams.reuse_cond_output,
            fixed_shapes=not hparams.early_exit,
            pivot_store=pl_module.open_pivot_store(),
        )
        # The module's optimiser is the walk's: one RowAdam over the same parameters.
        pl_module.slot_walk.optimizer = trainer.optimizers[0]
        pl_module.all_done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any], batch_idx: int) -> None:
        walk: SlotWalk = pl_module.slot_walk
        stream = trainer.train_dataloader.dataset
        if walk.free_slots():
            # A slot-count's worth of pivots at once: one batched inversion, not one per newcomer.
            while not walk.waiting and stream.remaining:
                samples, pixels, failed = stream.take(walk.slots)
                for sample, reason in failed:
                    self.failures.append({"id": sample.id, "image": str(sample.image), "reason": reason})
                if samples:
                    self._prepare(trainer, pl_module, samples, pixels)
            with trainer.precision_plugin.forward_context():
                walk.admit(pl_module.denoiser)
        pl_module.all_done = not walk.busy and not stream.remaining

    def _prepare(self, trainer: pl.Trainer, module: Any, samples: list[Any], pixels: torch.Tensor) -> None:
        pixels = pixels.to(module.device)
        # Text encoders and VAE run in their own dtype, not under autocast (as in lockstep).
        cond = module.encode([sample.prompt for sample in samples])
        z0 = vae_codec.encode(module.vae, pixels)
        with trainer.precision_plugin.forward_context():
            module.slot_walk.prepare(
                module.denoiser, pixels, z0, cond, [s.id for s in samples], [s.prompt for s in samples], samples
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        walk: SlotWalk = pl_module.slot_walk
        ready = walk.ready_slots()
        if not ready:
            return
        iterations = walk.iteration[ready].float().mean()
        losses = walk.loss[ready]
        with trainer.precision_plugin.forward_context():
            finished = walk.advance(pl_module.denoiser, ready)
        metrics = {"timestep/inner_iterations": float(iterations)}
        if pl_module.optimises:
            metrics["timestep/loss"] = float(losses.mean())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self.advances)
        self.advances += 1
        if finished:
            self._finish_images(trainer, pl_module, finished)
            pl_module.images_done += len(finished)
        stream = trainer.train_dataloader.dataset
        pl_module.all_done = not walk.busy and not stream.remaining

    def _finish_images(self, trainer: pl.Trainer, module: Any, images: list[SlotImage]) -> None:
        pixels = torch.stack([image.pixels for image in images])
        z0 = torch.cat([image.pivot.z0 for image in images])
        z_T = torch.cat([image.pivot.z_T for image in images])
        latent = torch.cat([image.latent for image in images])
        cond = Condition.cat([image.cond for image in images])
        rows, grids = self._report(module, pixels, z0, z_T, latent, cond)
        metadata = _metadata(module, list(z0.shape[1:]))
        now = time.perf_counter()
        self._write_images(
            trainer,
            module,
            [image.payload for image in images],
            [image.inversion(metadata, module.method.stores_pivot) for image in images],
            rows,
            grids,
            [now - image.started for image in images],
        )
