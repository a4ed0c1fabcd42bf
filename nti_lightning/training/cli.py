"""`nti fit`: Null-text Inversion of images, as a LightningCLI.

    nti fit --config configs/demo.yaml
    nti fit --config configs/invert.yaml --data.images photo.png --data.prompts "a cat on a sofa"

Every argument of the module (`NullTextInversion`), the data module (`InversionDataModule`) and
the Trainer can come from YAML (`--config`), the command line, or both.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LightningCLI

from nti_lightning.data.datamodule import InversionDataModule
from nti_lightning.storage.run_config import SaveConfigBesideResults
from nti_lightning.training.module import NullTextInversion

#: Trainer settings the walk needs: it sets its own epoch count, never mixes ranks' images, and
#: keeps no checkpoints (the artifacts are the results).
FIT_TRAINER_DEFAULTS = {
    "max_epochs": -1,
    "use_distributed_sampler": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "enable_model_summary": False,  # the only parameter is the null embedding; the rest is frozen
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "nti", "default_hp_metric": False},
    },
}


def fit_cli(args: Optional[list[str]] = None) -> LightningCLI:
    """Runs `nti fit` with `args` (the full list, "fit" first), or the command line (`nti validate`
    and `nti test` are not offered: inversion only fits)."""
    return LightningCLI(
        NullTextInversion,
        InversionDataModule,
        trainer_defaults=FIT_TRAINER_DEFAULTS,
        save_config_callback=SaveConfigBesideResults,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
