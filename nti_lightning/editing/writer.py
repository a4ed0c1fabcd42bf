"""`EditWriter`: writes what `EditModule.predict_step` returns, one sample at a time.

Per edit `<id>` in `output_dir`:

* `<id>.png`: the labelled grid input | reconstruction | edits;
* `<id>_edit<k>.png`: edit k (k = 1 for the first edit prompt) at the model's resolution;
* `<id>_attention.png`: the source prompt's cross-attention maps per token;
* `<id>_input.png` with `save_inputs`: the input as the model sees it, the VAE's decoding of the
  inversion's source latent (the VAE round trip: what an edit that kept the source latent would give);

and `failures.jsonl`, one line per edit that could not be made (also logged as a warning). Each
device writes the samples of its own shard; file names come from the unique ids, so devices never
write the same file. Grids and attention maps also go to TensorBoard when that is the logger.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger

from nti_lightning.data.images import to_pil
from nti_lightning.editing.pictures import labelled_grid
from nti_lightning.storage.atomic import ensure_folder

log = logging.getLogger(__name__)

FAILURES = "failures.jsonl"


class EditWriter(BasePredictionWriter):
    """Writes edit grids, edited images, attention maps and failures.

    Args:
        output_dir (`str`, defaults to "edits"): where the files go (created if needed).
        log_images (`bool`, defaults to True): also log grids and attention maps to TensorBoard.
        save_inputs (`bool`, defaults to False): also write `<id>_input.png`, the VAE round trip.
    """

    def __init__(self, output_dir: str = "edits", log_images: bool = True, save_inputs: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.log_images = log_images
        self.save_inputs = save_inputs
        self.written = 0
        self.failed = 0

    @property
    def failures_path(self) -> Path:
        return self.output_dir / FAILURES

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.written = self.failed = 0
        if trainer.is_global_zero:
            ensure_folder(self.output_dir)
            # Failures of an earlier run into the same folder would read as this run's.
            self.failures_path.unlink(missing_ok=True)
        trainer.strategy.barrier("edit_writer_setup")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for result in prediction:  # one per spec of the batch
            if "error" in result:
                self.record_failure(result)
            else:
                self.write(trainer, result)

    def write(self, trainer: pl.Trainer, prediction: dict[str, Any]) -> None:
        """Writes the PNGs of one edit (and logs them)."""
        name = prediction["id"]
        images = [to_pil(image) for image in prediction["images"]]
        grid = labelled_grid(images, prediction["labels"])
        grid.save(self.output_dir / f"{name}.png")
        for k, image in enumerate(images[prediction.get("first_edit", 2):], start=1):  # after input and reconstruction
            image.save(self.output_dir / f"{name}_edit{k}.png")
        if self.save_inputs:
            images[0].save(self.output_dir / f"{name}_input.png")
        attention = prediction.get("attention")
        if attention is not None:
            attention.save(self.output_dir / f"{name}_attention.png")
        if self.log_images:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"edit/{name}", np.asarray(grid), self.written, dataformats="HWC")
                    if attention is not None:
                        logger.experiment.add_image(
                            f"attention/{name}", np.asarray(attention), self.written, dataformats="HWC"
                        )
        self.written += 1

    def record_failure(self, prediction: dict[str, Any]) -> None:
        """Appends the failure to `failures.jsonl` and logs it."""
        record = {"id": prediction["id"], "where": prediction["where"], "error": prediction["error"]}
        if isinstance(prediction.get("spec"), dict) and "artifact" in prediction["spec"]:
            record["artifact"] = prediction["spec"]["artifact"]
        # One write per line in append mode: lines from several devices do not interleave.
        line = (json.dumps(record) + "\n").encode("utf-8")
        descriptor = os.open(self.failures_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)
        log.warning("edit %s (%s) failed: %s", record["id"], record["where"], record["error"])
        self.failed += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = f"device {trainer.global_rank}: " if trainer.world_size > 1 else ""
        if self.failed:
            log.warning(
                "%s%d edit(s) written to %s, %d failed (see %s)",
                device, self.written, self.output_dir, self.failed, self.failures_path,
            )
        # The run's summary line, as `nti fit` ends with one: every device's counts added up
        # (every device gets here, so the sum cannot hang).
        counts = torch.tensor([float(self.written), float(self.failed)], device=pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        written, failed = (int(value) for value in counts.tolist())
        if trainer.is_global_zero:
            print(
                f"nti: {written} edit(s) written, {failed} failed; pictures in {self.output_dir}"
                + (f", failures in {self.failures_path}" if failed else "")
            )
