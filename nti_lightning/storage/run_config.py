"""`SaveConfigBesideResults`: the resolved config of `nti fit` / `nti predict` kept with what it made.

LightningCLI writes `config.yaml` into the logger's folder, or into the current directory when
there is no logger. A run's config belongs beside its artifacts or edits: the folder then says
how it was made, whatever the logger, and reruns into it (resume) keep it up to date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import SaveConfigCallback

from nti_lightning.storage.atomic import atomic_text


def results_folder(trainer: pl.Trainer, pl_module: Any) -> Optional[Path]:
    """Where the run writes its results: the module's `output_dir` (fit) or the prediction
    writer's (predict); `None` when the results stay in memory."""
    output_dir = getattr(getattr(pl_module, "hparams", None), "output_dir", None)
    if output_dir is None:
        writers = [c for c in trainer.callbacks if isinstance(c, BasePredictionWriter) and hasattr(c, "output_dir")]
        output_dir = writers[0].output_dir if writers else None
    return None if output_dir is None else Path(output_dir)


class SaveConfigBesideResults(SaveConfigCallback):
    """Writes the resolved config as `config.yaml` into the run's results folder (rank 0 only,
    atomically, replacing an earlier run's); without one, into the logger's folder as
    LightningCLI does, or nowhere when there is no logger either."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = results_folder(trainer, pl_module)
        if folder is None:
            if trainer.logger is not None:
                super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            with atomic_text(folder / self.config_filename) as handle:
                handle.write(self.parser.dump(self.config, skip_none=False))
        self.already_saved = True
