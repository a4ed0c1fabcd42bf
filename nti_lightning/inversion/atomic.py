"""Atomic writes: a file appears under its name complete, or not at all.

Everything a run writes goes to a temporary file in the same folder first and is renamed into
place only when fully written, so a run killed at any moment (even with SIGKILL) leaves either
the previous file or the new one, never half of one: a rerun can trust what it finds.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it to `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_text(path: str | Path) -> Iterator[IO[str]]:
    """An open text file (UTF-8, no newline translation) written atomically to `path`."""
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8", newline="") as handle:
        yield handle
