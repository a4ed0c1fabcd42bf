"""`keep_freed_memory`: glibc's heap told to keep freed memory for the next step instead of
handing it back to the kernel, so a CPU run stops page-faulting its own buffers in every step.

Why: a batched UNet call on a CPU allocates tens of MB of activations (24 edits at once on the
`shapes` model: 96 rows, 15 MB per attention map) and frees them when it returns. glibc's
malloc returns the top of its heap to the kernel once more than its trim threshold is free
there (by default twice its largest recent mmap'd allocation, at most 64 MB), and serves any
allocation above its mmap threshold (at most 32 MB) with a fresh mapping. Either way the next
call touches new pages: each is a page fault and a zeroed 4 KB page. Measured on the offline
bench's 24 edits at once (2-core x86-64 VM, T = 50): up to 0.5-1.6 million minor faults per
run without this, from about 100 to 164 thousand with it, and a median run 13% faster; one edit
at a time faulted about 100 pages either way (its buffers fit under the defaults). BENCHMARKS.md
has the runs.

The price is that a process holds on to its peak heap: memory freed after the peak stays
mapped (up to `trim_threshold` of it) for the next allocation to reuse, rather than being
returned. That is what a run of many same-shaped steps wants. GPU runs allocate their big
buffers on the device and are unaffected.

`nti` applies it at start-up (set `NTI_KEEP_FREED_MEMORY=0` to keep glibc's defaults); from
Python, call it once. Off glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Environment variable that turns the `nti` command's call off ("0", "false", "no", "off").
ENV_SWITCH = "NTI_KEEP_FREED_MEMORY"


def keep_freed_memory(mmap_threshold: int = 512 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Sets glibc's malloc to serve allocations up to `mmap_threshold` from its heap and to keep
    up to `trim_threshold` of freed memory at the heap's top. Idempotent; process-wide.

    Args:
        mmap_threshold (`int`, defaults to 512 MiB): allocations of at least this many bytes
            still get their own mapping (returned to the kernel when freed); glibc's default
            adapts between 128 KB and 32 MB.
        trim_threshold (`int`, defaults to 1 GiB): free memory at the top of the heap beyond this
            is returned to the kernel; glibc's default adapts between 128 KB and 64 MB.

    Returns:
        `bool`: True when glibc took both settings; False where the C library is not glibc (or
        refused them), and nothing changed.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value < 2**31:  # mallopt takes a C int
            raise ValueError(f"{name} must be between 1 and 2**31 - 1 bytes, got {value}")
    libc = _glibc()
    if libc is None:
        return False
    # Setting either threshold stops glibc adapting both; each call fixes its own.
    return bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold))) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))
    )


def keep_freed_memory_unless_disabled() -> bool:
    """`keep_freed_memory()` unless `NTI_KEEP_FREED_MEMORY` says no; what the `nti` command runs."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return keep_freed_memory()


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
