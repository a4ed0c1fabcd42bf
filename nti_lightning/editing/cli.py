"""`nti predict`: Prompt-to-Prompt edits of inversion files, as a LightningCLI.

    nti predict --config configs/edit.yaml
    nti predict --config configs/edit.yaml --data.edits_file edits.jsonl --writer.output_dir edits

The config has four parts: `model` (`EditModule`: the model and the default edit settings),
`data` (`EditDataModule`: the edit specs), `writer` (`EditWriter`: where the pictures go) and
`trainer` (devices, precision, logger). Edits are sharded across devices.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nti_lightning.editing.data import EditDataModule
from nti_lightning.editing.module import EditModule
from nti_lightning.editing.writer import EditWriter
from nti_lightning.storage.run_config import SaveConfigBesideResults


class EditCLI(LightningCLI):
    """LightningCLI with the `predict` subcommand only and an `EditWriter` under `writer`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EditWriter, "writer")

    def predict(self, model: EditModule, datamodule: Optional[EditDataModule] = None, **kwargs: Any) -> None:
        # Everything is written by EditWriter as it comes; keeping every picture in memory until
        # the end as well (Lightning's default) would grow with the number of edits.
        kwargs["return_predictions"] = bool(kwargs.get("return_predictions"))
        self.trainer.predict(model, datamodule=datamodule, **kwargs)


def main(args: Optional[list[str]] = None) -> EditCLI:
    """Runs `nti predict` with `args` (the full list, "predict" first), or the command line."""
    return EditCLI(
        EditModule,
        EditDataModule,
        args=args,
        save_config_callback=SaveConfigBesideResults,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=False,  # editing draws no random numbers
        auto_configure_optimizers=False,  # nothing is optimised
        trainer_defaults={"enable_model_summary": False},
    )


if __name__ == "__main__":
    main()
