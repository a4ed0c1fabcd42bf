"""The `nti` command: `nti fit` inverts images, `nti predict` edits inversions, `nti report`
puts the reports of several runs in one table, `nti train-demo` trains the built-in demo model.

`fit` and `predict` are `LightningCLI`s, so every argument of the module, the data module and the Trainer
can come from YAML (`--config`), the command line, or both; `--print_config` shows the result.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from nti_lightning.data.datamodule import InversionDataModule
from nti_lightning.training.module import NullTextInversion

#: Trainer settings the walk needs: it sets its own epoch count, never mixes ranks' images, and
#: keeps no checkpoints (the artifacts are the results).
FIT_TRAINER_DEFAULTS = {
    "max_epochs": -1,
    "use_distributed_sampler": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "nti"},
    },
}


def fit_cli(args: Optional[list[str]] = None) -> LightningCLI:
    """`nti fit` (and `nti validate/test` are not offered: inversion only fits)."""
    return LightningCLI(
        NullTextInversion,
        InversionDataModule,
        trainer_defaults=FIT_TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the `nti` console script."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "predict":
        from nti_lightning.editing.cli import main as edit_main

        edit_main(args)
        return
    if args and args[0] == "train-demo":
        from nti_lightning.demo.train import main as train_demo_main

        train_demo_main(args[1:])
        return
    if args and args[0] == "report":
        from nti_lightning.inversion.dataset_report import main as report_main

        report_main(args[1:])
        return
    if args and args[0] not in ("fit", "-h", "--help") and not args[0].startswith("--"):
        raise SystemExit(
            f"nti: unknown command {args[0]!r}; use `nti fit`, `nti predict`, `nti report` or `nti train-demo`"
        )
    fit_cli(args)


if __name__ == "__main__":
    main()
