"""`OutputLock`: one `nti fit` per output folder at a time.

Two runs writing the same folder would each plan the same pending images, invert them twice and
race on the report. Rank 0 takes the lock, a file `.nti.lock` naming its process, before it
plans the run, and gives it back when the run ends, fails or is interrupted. A lock whose process
is gone (killed with SIGKILL, or the machine restarted) is stale, and the next run takes it over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

from nti_lightning.errors import OutputError
from nti_lightning.storage.atomic import ensure_folder

LOCK_NAME = ".nti.lock"


class OutputLock:
    """The lock of one output folder.

    Args:
        folder (`str` or `Path`): the output folder (created if needed).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> "OutputLock":
        """Takes the lock, or raises `OutputError` naming the folder and the process using it."""
        ensure_folder(self.folder)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _owner(self.path)
                if owner is not None and _alive(owner):
                    raise OutputError(
                        f"{self.folder}: in use by another nti run (process {owner.get('pid')} on "
                        f"{owner.get('host')}); wait for it to finish or use another output_dir"
                        + (
                            ""
                            if owner.get("host") == socket.gethostname()
                            else f" (if no run is active, remove {self.path})"
                        )
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as error:
                raise OutputError(f"{self.path}: cannot create the lock file ({error.strerror or error})") from error
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
            self.held = True
            return self
        raise OutputError(f"{self.path}: another run took the lock at the same moment; try again")

    def release(self) -> None:
        """Gives the lock back (nothing happens when it is not held)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _owner(path: Path) -> Optional[dict[str, Any]]:
    """The lock file's `{"pid", "host"}`, or `None` when it is unreadable (a half-written lock)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the lock's process still runs; a lock from another machine is taken as alive."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # exists, but belongs to someone else (or the pid is nonsense: be safe)
    return True
