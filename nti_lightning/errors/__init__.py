"""The exceptions for a user's mistakes, and the rules for names that become file names.

Every error a user can cause (a bad image, dataset, artifact, option or model reference) is an
`NtiError`. The `nti` command prints such an error as one line, `nti: error: <message>`, and
exits with status 2; the Python API raises it as it is. Anything else is a bug and keeps its
traceback. Each subclass also derives from the built-in exception it refines (`ValueError`,
`FileNotFoundError`), so code written against those keeps working.
"""

from __future__ import annotations

#: Exit statuses of `nti` (docs/ERRORS.md).
EXIT_OK = 0  # every image inverted or skipped, every edit written
EXIT_SOME_FAILED = 1  # the run finished, but some images or edits failed (see failures.jsonl)
EXIT_USAGE = 2  # nothing ran: a usage or configuration error
EXIT_SIGINT = 130  # interrupted by Ctrl-C; what was done is kept, rerun to finish
EXIT_SIGTERM = 143  # stopped by SIGTERM (e.g. a preempted cluster job); the same


#: Longest id, in UTF-8 bytes: `<id>.safetensors.<pid>.tmp` must fit a 255-byte file name.
MAX_ID_BYTES = 200


class NtiError(Exception):
    """A mistake in what the user gave; the message names the file, option or word at fault."""


class OptionError(NtiError, ValueError):
    """An option has a value the run cannot use (a zero step count, an unknown precision, ...)."""


class ModelError(NtiError, ValueError):
    """A model reference cannot be loaded, or does not fit the artifact it is used with."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model folder or checkpoint file that does not exist."""


class InputNotFoundError(NtiError, FileNotFoundError):
    """An input file (edits file, report) that does not exist."""


class OutputError(NtiError, OSError):
    """An output file or folder cannot be written (read-only, disk full, not a folder)."""


class BenchmarkError(NtiError, ValueError):
    """A benchmark's annotations or outputs do not fit its layout (a bad mask, a missing image)."""


def unsafe_id_reason(name: str) -> str | None:
    """Why `name` cannot be an artifact name, or `None` when it is one plain file name.

    Ids name files inside the output folder, so one must stay there: no path separator, no
    `..`, no control characters, no leading dot (hidden files, and our own temporary files),
    at most `MAX_ID_BYTES` bytes.
    """
    if not name:
        return "the id is empty"
    if "/" in name or "\\" in name:
        return f"id {name!r} holds a path separator"
    if ".." in name:
        return f"id {name!r} holds '..'"
    if name.startswith("."):
        return f"id {name!r} starts with a dot"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return f"id {name!r} holds a control character"
    if len(name.encode("utf-8")) > MAX_ID_BYTES:
        return f"id {name[:40]!r}... is longer than {MAX_ID_BYTES} bytes"
    return None


def check_id(name: str, where: str = "") -> str:
    """`name`, or `OptionError` saying why it cannot name a file (prefixed by `where`)."""
    reason = unsafe_id_reason(name)
    if reason is not None:
        raise OptionError(f"{where}: {reason}" if where else reason)
    return name
