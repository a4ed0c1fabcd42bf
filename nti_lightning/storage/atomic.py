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

from nti_lightning.errors import OutputError


def ensure_folder(folder: str | Path) -> Path:
    """Creates `folder` (and its parents) if needed; `OutputError` naming it when it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{folder}: cannot create the output folder ({error.strerror or error})") from error
    return folder


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it to `path` when the block succeeds.

    A write that fails (disk full, read-only file system) raises `OutputError` naming `path`
    and its cause, and leaves no temporary file; what was written before stays as it was.
    """
    path = Path(path)
    ensure_folder(path.parent)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_text(path: str | Path) -> Iterator[IO[str]]:
    """An open text file (UTF-8, no newline translation) written atomically to `path`."""
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8", newline="") as handle:
        yield handle
