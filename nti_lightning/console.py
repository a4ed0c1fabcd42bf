"""What a run prints: other libraries' notices that tell an `nti` user nothing, silenced.

A run should show Lightning's progress, the summary table and the paths written. The notices
dropped here are each one that cannot be avoided by calling the library differently (those that
can, are: `dtype=` for diffusers, argv given to LightningCLI once, no model summary of frozen
networks, no `hp_metric`). Importing `nti_lightning` installs the filters; they match the exact
notices, so anything else those libraries say still gets through.
"""

from __future__ import annotations

import logging
import warnings

#: (logger name, a phrase of the message) of the log records dropped.
_DROPPED_RECORDS = (
    # diffusers' pipelines touch CLIP's image processor (for safety checkers never loaded); the
    # package does not use torchvision, so its fallback to PIL changes nothing.
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # Advertising for Lightning's cloud products, printed at every fit.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud"),
)


class _DropNotice(logging.Filter):
    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def silence_notices() -> None:
    """Installs the filters (idempotent: a filter already there is not added twice)."""
    for name, phrase in _DROPPED_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.phrase == phrase for f in logger.filters):
            logger.addFilter(_DropNotice(phrase))
    # Lightning's own pytree helper calls a torch API that torch deprecated; not ours to change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
