"""`InversionProgressBar`: images done out of the whole run, shown to suit where it goes.

Lightning's own bar counts epochs and batches, which here are timesteps and inner iterations;
a user inverting a dataset wants "how many images are done". Where the output goes decides the
form:

* a terminal or a notebook: a live tqdm bar (`tqdm.auto`, a widget in Jupyter, as diffusers'
  pipelines show), with the slots' steps (or the timestep and inner iteration) beside it;
* anything else, such as a batch job's log file: one line every `interval` seconds (30 by
  default, `NTI_PROGRESS_INTERVAL` overrides it) and one at the end, each with the images done
  over all ranks, the rate and the time left, so that a run of hours leaves a readable log
  instead of one redraw per training batch.

The last line says "done in 5m12s" when the walk finished, "stopped after 3m40s" (with the images done
so far) when it failed or was interrupted; a run that fails before its walk starts (while it is set up)
prints no progress line at all, its error says what went wrong.

Counts cover all ranks. Lockstep ranks walk their batches together (Lightning synchronises them
at every batch), so the plan says how many images the batches finished so far hold. Continuous
ranks agree on their counts every `sync_every` batches; in between a rank's own count shows,
and the last line adds up every rank's count, so it is the true total.

`ProgressHook` hands the same walk to a function of one's own (`invert(on_progress=...)`), for
front ends that draw their own progress (the `nti app` web page) and may cancel the run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar

#: Seconds between two progress lines on a non-terminal, unless NTI_PROGRESS_INTERVAL says otherwise.
DEFAULT_INTERVAL = 30.0


def is_interactive(stream: TextIO) -> bool:
    """Whether `stream` is watched live: a terminal, or a Jupyter kernel's output."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """`seconds` as "42s", "7m05s" or "3h12m"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class InversionProgressBar(ProgressBar):
    """Images done / total: a live bar on a terminal or in a notebook, timed lines elsewhere.

    Args:
        interval (`float`, *optional*): seconds between two lines on a non-terminal; defaults to
            `NTI_PROGRESS_INTERVAL` or 30.
        stream (`TextIO`, *optional*): where the progress goes; defaults to standard error.
        live (`bool`, *optional*): force the live bar (True) or the lines (False); by default a
            terminal or a notebook gets the bar.
    """

    def __init__(
        self, interval: Optional[float] = None, stream: Optional[TextIO] = None, live: Optional[bool] = None
    ) -> None:
        super().__init__()
        if interval is None:
            interval = float(os.environ.get("NTI_PROGRESS_INTERVAL") or DEFAULT_INTERVAL)
        self.interval = interval
        self.stream = stream
        self.live = live
        self._enabled = True
        self.bar: Any = None
        self.total: Optional[int] = None
        self.done = 0
        # When the walk started (`time.monotonic()`); None before it starts and once its last line is out, so that
        # a run that fails before it starts (a bad output folder) prints no line, and never one timed from 0.
        self.started: Optional[float] = None
        self.last_line = float("-inf")
        self.lines = 0

    # -------------------------------------------------------------- ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # The module brings this bar along; drop the Trainer's default one (tqdm or rich) so
        # that a single bar is drawn.
        trainer.callbacks = [c for c in trainer.callbacks if c is self or not isinstance(c, ProgressBar)]
        if not trainer.is_global_zero:
            self.disable()

    # --------------------------------------------------------------------------- the walk
    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        plan = _plan(trainer)
        self.total = plan.num_images if plan is not None else None
        self.done, self.started, self.last_line, self.lines = 0, time.monotonic(), float("-inf"), 0
        if not self.is_enabled:
            return
        stream = self.stream or sys.stderr
        if self.live if self.live is not None else is_interactive(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="images", unit="image", file=stream, dynamic_ncols=True, leave=True)
        else:
            self._line(final=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.is_enabled or pl_module.schedule is None:
            return
        if "tick" in batch:  # continuous batching: slots at their own steps
            # Images done over all ranks, as last agreed; this rank's own count in between.
            postfix = _slot_postfix(pl_module) if self.bar is not None else None
            self._show(max(pl_module.images_done_all, pl_module.images_done), postfix)
        elif self.bar is not None:
            step = batch["step"]
            self._show(self.done, {
                "step": f"{step + 1}/{pl_module.hparams.num_inference_steps}",
                "t": int(pl_module.schedule.timesteps[step]),
                "iteration": batch["iteration"] + 1,
            })

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        plan = _plan(trainer)
        if plan is None or not self.is_enabled or pl_module.continuous:
            return  # continuous batching counts images as they finish (on_train_batch_end)
        batches_finished = (trainer.current_epoch + 1) // pl_module.hparams.num_inference_steps
        self._show(plan.images_done(batches_finished), None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        done = self.done
        if pl_module.continuous:
            # Every rank gets here (after the same number of epochs), so the sum cannot hang.
            local = torch.tensor(float(pl_module.images_done), device=pl_module.device)
            done = int(trainer.strategy.reduce(local, reduce_op="sum").item()) if trainer.world_size > 1 else int(local)
        if self.is_enabled and self.started is not None:
            self._show(done, None)
            self._close(stopped=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # No collective here: the other ranks may be gone. This rank's last known count shows, on a line that
        # says the run stopped. Before the walk started (the error came from setting up) there is nothing to
        # report: the error itself says what went wrong.
        if self.is_enabled and self.started is not None:
            self._close(stopped=True)

    # -------------------------------------------------------------------------- display
    def _show(self, done: int, postfix: Optional[dict[str, Any]]) -> None:
        self.done = done
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.n = done
            self.bar.refresh()
        elif time.monotonic() - self.last_line >= self.interval:
            self._line(final=False)

    def _close(self, stopped: bool) -> None:
        """Ends the walk's display: closes the live bar, or prints the last line.

        Args:
            stopped (`bool`): the run failed or was interrupted: the last line says it stopped (and a live bar is
                followed by that line), never "done".
        """
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if stopped:  # the bar's last state reads like a run still going: say that it is not
                self._line(final=True, stopped=True)
        else:
            self._line(final=True, stopped=stopped)
        self.started = None  # the run's display is over: nothing more is printed for it

    def _line(self, final: bool, stopped: bool = False) -> None:
        """One line: "nti: images 3/5 (60%), 2.4 images/min, about 50s left".

        Args:
            final (`bool`): the run's last line: "done in 1m05s" instead of the time left.
            stopped (`bool`, defaults to False): with `final`, the run failed or was interrupted: "stopped after 1m05s".
        """
        now = time.monotonic()
        elapsed = now - (self.started if self.started is not None else now)
        total = "?" if self.total is None else str(self.total)
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        parts = [f"nti: images {self.done}/{total}{share}"]
        end = f"stopped after {duration(elapsed)}" if stopped else f"done in {duration(elapsed)}"
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            parts.append(f"{60 * rate:.3g} images/min")
            if final:
                parts.append(end)
            elif self.total:
                parts.append(f"about {duration(max(self.total - self.done, 0) / rate)} left")
        elif final:
            parts.append(end)
        print(", ".join(parts), file=self.stream or sys.stderr, flush=True)
        self.last_line = now
        self.lines += 1


def _slot_postfix(pl_module: Any) -> dict[str, str]:
    walk = pl_module.slot_walk
    busy = [s for s, image in enumerate(walk.images) if image is not None]
    return {"slots": f"{len(busy)}/{walk.slots}", "steps": ",".join(str(int(walk.step[s]) + 1) for s in busy) or "-"}


def _plan(trainer: pl.Trainer) -> Any:
    return getattr(getattr(trainer, "datamodule", None), "plan", None)


# ------------------------------------------------------------------ a hook for other front ends
@dataclass(frozen=True)
class WalkProgress:
    """Where an inversion run stands, as `invert(on_progress=...)` reports it after every inner iteration.

    Attributes:
        images_done (`int`): images finished so far.
        images (`int`): images of the run.
        step (`int`): step of the least advanced image being walked, 0-based (step 0 is the
            noisiest timestep; the walk goes from T to 1).
        num_steps (`int`): T.
        timestep (`int`): the model's timestep at that step (e.g. 981 for step 0 of 50 on SD).
        iteration (`int`): inner iterations done so far at that step.
        num_inner_steps (`int`): N (1 for the methods without optimisation).
        fraction (`float`): the share of the run's steps done, from 0 to 1.
        stage (`str`): "pivot" when the walk starts (the DDIM inversion of the first images is
            being computed: T UNet calls), "walk" after each inner iteration.
    """

    images_done: int
    images: int
    step: int
    num_steps: int
    timestep: int
    iteration: int
    num_inner_steps: int
    fraction: float
    stage: str = "walk"


class ProgressHook(pl.Callback):
    """Calls `report(WalkProgress)` when the walk starts (before the pivot) and after every training
    batch (one inner iteration). An exception raised by `report` stops the run: `invert` raises it, having written
    nothing (with `output_dir`, the artifacts of images finished before it are kept), so a front
    end can cancel a run from its own thread by raising in `report`.
    """

    def __init__(self, report: Callable[[WalkProgress], None]) -> None:
        self.report = report

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.report(walk_progress(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.report(walk_progress(trainer, pl_module, batch))


def walk_progress(trainer: pl.Trainer, pl_module: Any, batch: Optional[dict[str, Any]] = None) -> WalkProgress:
    """The run's `WalkProgress` after `batch` (before the first batch when None)."""
    plan = _plan(trainer)
    images = plan.num_images if plan is not None else 0
    steps, inner = pl_module.hparams.num_inference_steps, pl_module.inner_iterations
    done = len(pl_module.results)  # the Python API keeps each finished image
    if batch is None or "tick" in batch:  # continuous batching: each slot at its own place
        walk = pl_module.slot_walk
        busy = [s for s, image in enumerate(walk.images) if image is not None] if walk is not None else []
        places = [(int(walk.step[s]), min(int(walk.iteration[s]), inner)) for s in busy]
    else:
        in_flight = max(0, min(pl_module.batch_slots, images - done))
        places = [(int(batch["step"]), int(batch["iteration"]) + 1)] * in_flight
    step, iteration = min(places) if places else (0, 0)
    share = sum(min(1.0, (s + i / inner) / steps) for s, i in places)
    fraction = (done + share) / images if images else 0.0
    timestep = int(pl_module.schedule.timesteps[min(step, steps - 1)]) if pl_module.schedule is not None else 0
    stage = "pivot" if batch is None else "walk"
    return WalkProgress(done, images, step, steps, timestep, iteration, inner, min(1.0, fraction), stage)
