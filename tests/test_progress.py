"""Progress where users run it (a terminal, a notebook, a batch job's log file), and the Python
API's quiet default. The log-file runs under DDP are in test_slots.py and test_dataset.py."""

from __future__ import annotations

import io
import math
import re
import time

import pytest
from conftest import random_image

import nti_lightning as nti
from nti_lightning.errors import OutputError
from nti_lightning.training.progress import (
    InversionProgressBar,
    duration,
    is_interactive,
)


def progress_lines(text: str) -> list[str]:
    """The progress lines of a run's standard error (what a log file gets)."""
    return [line for line in text.splitlines() if line.startswith("nti: images ")]


def images_done(line: str) -> int:
    return int(line.split()[2].split("/")[0])


def assert_log_progress(stderr: str, total: int, seconds: float) -> None:
    """A bounded number of lines (one at the start, one per 30 s, one at the end), counts that
    only grow, and a last line that tells the truth."""
    lines = progress_lines(stderr)
    assert 2 <= len(lines) <= 2 + math.ceil(seconds / 30), lines
    counts = [images_done(line) for line in lines]
    assert counts == sorted(counts), lines
    assert lines[-1].startswith(f"nti: images {total}/{total} (100%)") and "done in" in lines[-1], lines


def test_invert_prints_nothing_to_stdout_and_returns_its_summary(capsys, monkeypatch):
    pipe = nti.load_pipeline("tiny")
    images = [random_image(seed) for seed in range(3)]
    monkeypatch.setenv("NTI_PROGRESS_INTERVAL", "0")  # a line at every batch
    result = nti.invert(pipe, images, "a red circle", num_inference_steps=3, num_inner_steps=2, batch_size=2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(result) == 3 and all(isinstance(inversion, nti.Inversion) for inversion in result)
    assert result.report.startswith("nti: 3 inverted, 0 skipped (already done), 0 failed")
    assert "| null_text | 3 |" in result.report and result.summary["null_text"]["images"] == 3
    lines = progress_lines(captured.err)
    assert len(lines) > 3 and [images_done(line) for line in lines] == sorted(images_done(line) for line in lines)
    assert lines[-1].startswith("nti: images 3/3 (100%)")
    assert "GPU available" not in captured.err  # Lightning's start-up notes are held back

    nti.invert(pipe, images[0], "a red circle", num_inference_steps=2, num_inner_steps=1, progress_bar=False)
    captured = capsys.readouterr()
    assert captured.out == "" and not progress_lines(captured.err)


def test_live_bar_where_someone_watches():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert is_interactive(Terminal()) and not is_interactive(io.StringIO())
    assert [duration(s) for s in (5, 65, 3 * 3600 + 12 * 60 + 7)] == ["5s", "1m05s", "3h12m"]


def test_on_progress_follows_the_walk_and_can_stop_it(tmp_path):
    pipe = nti.load_pipeline("tiny")
    images = [random_image(seed) for seed in range(3)]
    for scheduling in ("continuous", "lockstep"):
        seen = []
        nti.invert(pipe, images, "a red circle", num_inference_steps=3, num_inner_steps=2, batch_size=2,
                   progress_bar=False, scheduling=scheduling, on_progress=seen.append)
        assert seen[0].stage == "pivot" and seen[0].fraction == 0.0 and {p.stage for p in seen[1:]} == {"walk"}
        fractions = [p.fraction for p in seen]
        assert fractions == sorted(fractions) and 0.9 <= fractions[-1] <= 1.0, (scheduling, fractions)
        assert all(p.images == 3 and p.num_steps == 3 and p.num_inner_steps == 2 for p in seen)
        assert {p.timestep for p in seen[1:]} == set(_timesteps(pipe, 3))
        assert {p.iteration for p in seen[1:]} <= {1, 2}

    class Stop(Exception):
        pass

    def stop_at_step_two(progress) -> None:
        if progress.step == 1:
            raise Stop

    output = tmp_path / "out"
    try:
        nti.invert(pipe, images[0], "a red circle", num_inference_steps=3, num_inner_steps=2, progress_bar=False,
                   output_dir=str(output), on_progress=stop_at_step_two)
    except Stop:
        pass
    else:
        raise AssertionError("the exception raised by on_progress must stop invert")
    assert not list(output.glob("*.safetensors")) and not list(output.glob(".*.tmp"))


def _timesteps(pipe, steps: int) -> list[int]:
    from nti_lightning.diffusion.ddim import DDIMSchedule

    return [int(t) for t in DDIMSchedule.from_scheduler_config(pipe.scheduler.config, steps).timesteps]


def test_a_run_that_fails_before_the_walk_prints_no_progress_line(tmp_path, capsys):
    # An output folder that cannot be made (a file stands in its way) stops the run while it is set up: its
    # error says so, and no progress line claims anything was done (it said "0/?, done in <the uptime>").
    (tmp_path / "a-file").write_text("")
    pipe = nti.load_pipeline("tiny")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        nti.invert(pipe, random_image(0), "a red circle", num_inference_steps=2, num_inner_steps=1,
                   output_dir=str(tmp_path / "a-file" / "out"))
    assert not progress_lines(capsys.readouterr().err)


def test_a_run_that_fails_during_the_walk_ends_on_a_stopped_line(capsys, monkeypatch):
    class Stop(Exception):
        pass

    def stop_at_step_two(progress) -> None:
        if progress.stage == "walk" and progress.step == 1:
            raise Stop

    pipe = nti.load_pipeline("tiny")
    monkeypatch.setenv("NTI_PROGRESS_INTERVAL", "0")  # a line at every batch
    started = time.monotonic()
    with pytest.raises(Stop):
        nti.invert(pipe, [random_image(0), random_image(1), random_image(2)], "a red circle", num_inference_steps=3,
                   num_inner_steps=2, batch_size=1, scheduling="lockstep", on_progress=stop_at_step_two)
    seconds = time.monotonic() - started
    lines = progress_lines(capsys.readouterr().err)
    assert lines and not any("done" in line for line in lines), lines
    last = re.fullmatch(r"nti: images (\d+)/3 \(\d+%\)(, [\d.]+ images/min)?, stopped after (\d+)s", lines[-1])
    assert last is not None, lines
    # The count so far (the first image is on its second step), the time from the walk's own start.
    assert int(last.group(1)) == 0 and int(last.group(3)) <= seconds + 1, (lines, seconds)


def test_the_last_line_is_printed_once_and_only_for_a_walk_that_started():
    stream = io.StringIO()
    bar = InversionProgressBar(interval=3600, stream=stream, live=False)
    bar.on_exception(None, None, RuntimeError("set-up failed"))
    assert stream.getvalue() == ""
    bar.started, bar.total, bar.done = time.monotonic() - 65, 4, 1
    bar.on_exception(None, None, RuntimeError("the walk failed"))
    bar.on_exception(None, None, RuntimeError("a second hook"))
    [line] = stream.getvalue().splitlines()
    assert line.startswith("nti: images 1/4 (25%), ") and line.endswith(", stopped after 1m05s"), line
