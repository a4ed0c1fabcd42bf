"""`keep_freed_memory`: glibc keeps a run's freed buffers instead of page-faulting them in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from nti_lightning import host_memory
from nti_lightning.cli import main

GLIBC = host_memory._glibc() is not None

# Allocates and frees a 40 MB tensor (above glibc's largest adaptive mmap threshold, 32 MB) 20
# times, writing it each time as an activation is written; prints the minor page faults taken.
FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from nti_lightning.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    for _ in range(3):  # warm-up: the first two allocations still grow the heap (measured), the third reuses it
        torch.ones(10 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(10 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults(*modes: str) -> list[int]:
    """The page faults counted by `FAULTS` in each mode, each in a fresh process of its own; the
    processes run side by side (each counts its own faults only)."""
    processes = [subprocess.Popen([sys.executable, "-c", FAULTS, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for mode in modes]
    counts = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        counts.append(int(out.split()[-1]))
    return counts


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere keep_freed_memory does nothing (tested below)")
def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    default, kept = faults("default", "keep")
    # Default: each 40 MB buffer is a fresh mapping, 10240 pages faulted per allocation.
    assert default > 20 * 5000, default
    # Kept: the heap serves the same 40 MB again; less than one buffer's pages in all 20.
    assert kept < 10240, (kept, default)


def test_it_does_nothing_and_says_so_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("value", ["0", "false", "off", " No "])
def test_the_environment_switch_turns_the_command_s_call_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(host_memory.ENV_SWITCH, value)
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: pytest.fail("called despite the switch"))
    assert host_memory.keep_freed_memory_unless_disabled() is False


def test_the_command_applies_it_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    monkeypatch.setattr("nti_lightning.cli.keep_freed_memory_unless_disabled", lambda: calls.append(True))
    main(["--help"])
    assert calls == [True]
    assert "commands:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["mmap_threshold", "trim_threshold"])
@pytest.mark.parametrize("value", [0, 2**31])
def test_thresholds_outside_a_c_int_are_refused(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=name):
        host_memory.keep_freed_memory(**{name: value})
