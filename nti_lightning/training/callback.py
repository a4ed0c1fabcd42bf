"""`NullTextWalkCallback`: the timestep boundaries of the null-text walk.

`NullTextInversion.training_step` is one inner Adam iteration. Everything that happens between
timesteps is here:

* at the first batch of an image batch: encode prompts and images, compute the pivot;
* at the start of each timestep: a fresh Adam (state cleared) at `lr·(1 - i/100)`, and the
  conditional UNet output computed once;
* at the end of each timestep: freeze the embedding, advance the latent with guided DDIM;
* after the last timestep: write the `.safetensors` artifacts, metrics, grids, TensorBoard;
* when fit ends: gather every rank's report rows on rank 0 and write the dataset report.

Empty batches (a rank with fewer images than the others) walk their epochs doing nothing.

Hooks outside `training_step` are not under Lightning's autocast, so the UNet calls here enter
the precision plugin's context themselves; the embedding, Adam, loss and DDIM arithmetic stay
fp32 under every supported precision.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

from nti_lightning.data.images import to_pil
from nti_lightning.data.walk import ImageSample
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import ArtifactError, Inversion
from nti_lightning.inversion.dataset_report import (
    image_row,
    summarize,
    summary_table,
    write_report,
)
from nti_lightning.inversion.null_text import step_learning_rate
from nti_lightning.inversion.report import ddim_reconstruction, reconstruction_report
from nti_lightning.inversion.trajectory import NullTextTrajectory
from nti_lightning.models import vae as vae_codec
from nti_lightning.version import __version__

#: Precisions under which the fp32 embedding, Adam and DDIM arithmetic are kept.
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class NullTextWalkCallback(pl.Callback):
    """Drives `NullTextInversion` from timestep to timestep (added by the module itself)."""

    def __init__(self) -> None:
        self.images_done = 0
        self.rows: list[dict[str, Any]] = []  # this rank's report rows
        self.failures: list[dict[str, str]] = []  # this rank's images that failed to decode
        self.started = 0.0
        self.failed = 0  # images of the whole run that failed, known on rank 0 when fit ends
        self.summary: dict[str, dict[str, float]] = {}  # per-method means, on rank 0 when fit ends
        self.report = ""  # the summary as `nti fit` prints it, on rank 0 when fit ends

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        precision = str(trainer.precision)
        if precision not in SUPPORTED_PRECISIONS:
            raise OptionError(
                f"trainer.precision {precision!r} is not supported: the null embedding, Adam and the DDIM "
                f"arithmetic must stay fp32; use one of {SUPPORTED_PRECISIONS}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # One epoch per (image batch, timestep): the walk's length decides when fit ends.
        trainer.fit_loop.max_epochs = trainer.train_dataloader.sampler.num_epochs
        pl_module.open_pivot_store()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["iteration"] != 0:
            return
        if batch["step"] == 0:
            self._start_trajectory(trainer, pl_module, batch)
        if pl_module.trajectory is None:  # an empty batch: nothing to walk
            pl_module.problem = None
            return
        with trainer.precision_plugin.forward_context():
            pl_module.problem = pl_module.trajectory.problem(pl_module.denoiser, pl_module.hparams.early_stop_epsilon)
        assert pl_module.problem.step == batch["step"], "walk and trajectory are out of step"
        optimizer = trainer.optimizers[0]
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] = step_learning_rate(batch["step"], pl_module.hparams.learning_rate)

    def _start_trajectory(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any]) -> None:
        self.started = time.perf_counter()
        self.samples: list[ImageSample] = batch["samples"]
        for sample, reason in batch["failed"]:
            self.failures.append({"id": sample.id, "image": str(sample.image), "reason": reason})
        pl_module.trajectory = None
        valid = batch["valid"]
        if not bool(valid.any()):
            return
        slots = len(valid)
        ids = [sample.id for sample in self.samples] + [""] * (slots - len(self.samples))
        prompts = [sample.prompt for sample in self.samples] + [""] * (slots - len(self.samples))
        # Text encoder and VAE are cheap next to the UNet: they run in their own dtype, not autocast.
        cond = pl_module.encode(prompts)
        pl_module.reset_null_embedding(cond)
        pixels = batch["pixels"].to(pl_module.device)
        z0 = vae_codec.encode(pl_module.vae, pixels)
        with trainer.precision_plugin.forward_context():
            pl_module.trajectory = NullTextTrajectory.start(
                pl_module.denoiser, pl_module.schedule, pixels, z0, cond, ids, prompts, valid, pl_module.pivot_store,
                pl_module.method, pl_module.empty,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trajectory, problem = pl_module.trajectory, pl_module.problem
        if trajectory is None:  # an empty padding batch (see InversionPlan.rank_batches)
            return
        with trainer.precision_plugin.forward_context():
            trajectory.advance(
                pl_module.schedule,
                pl_module.denoiser,
                problem,
                pl_module.null_condition(),
                pl_module.hparams.guidance_scale,
                reuse_cond_output=pl_module.hparams.reuse_cond_output,
            )
        slots = trajectory.valid
        step_metrics = {
            "timestep/loss": float(problem.loss[slots].mean()),
            "timestep/inner_iterations": float(problem.iterations[slots].float().mean()),
        }
        for logger in trainer.loggers:
            logger.log_metrics(step_metrics, step=trainer.current_epoch)
        if trajectory.done:
            self._finish_trajectory(trainer, pl_module)
            pl_module.trajectory = pl_module.problem = None

    def _finish_trajectory(self, trainer: pl.Trainer, module: Any) -> None:
        trajectory: NullTextTrajectory = module.trajectory
        slots = trajectory.slots
        index = torch.tensor(slots, device=trajectory.latent.device)
        pivot = trajectory.pivot
        rows, grids = self._report(
            module,
            trajectory.pixels[index],
            pivot.z0[index],
            pivot.z_T[index],
            trajectory.latent[index],
            trajectory.cond.rows(index),
        )
        seconds = (time.perf_counter() - self.started) / len(slots)
        samples = [self.samples[slot] for slot in slots]
        self._write_images(
            trainer,
            module,
            samples,
            trajectory.inversions(_metadata(module, list(pivot.z0.shape[1:]))),
            rows,
            grids,
            [seconds] * len(slots),
        )

    def _write_images(
        self,
        trainer: pl.Trainer,
        module: Any,
        samples: list[ImageSample],
        inversions: list[Inversion],
        rows: list[dict[str, float]],
        grids: torch.Tensor,
        seconds: list[float],
    ) -> None:
        """Writes finished images: artifacts, grids, TensorBoard, report rows (all lists per image)."""
        hparams = module.hparams
        output_dir = Path(hparams.output_dir) if hparams.output_dir is not None else None
        for k, (inversion, sample) in enumerate(zip(inversions, samples)):
            inversion.metadata.update(
                metrics=rows[k],
                seconds=seconds[k],
                image=str(sample.image) if not isinstance(sample.image, Image.Image) else None,
            )
            if sample.edits is not None:
                inversion.metadata["edits"] = sample.edits
            artifact = None
            if output_dir is not None:
                artifact = str(inversion.save(output_dir / f"{sample.id}.safetensors", hparams.null_dtype))
            # Booked as soon as its artifact exists: an interrupt while the grid or TensorBoard
            # is written must still count and report the image.
            self.rows.append(image_row({**inversion.metadata, "prompt": inversion.prompt}, "done", artifact))
            if output_dir is not None and hparams.save_grids:
                _grid_picture(grids[k]).save(output_dir / f"{sample.id}.png")
            self._log_image(trainer, sample.id, rows[k], grids[k] if hparams.save_grids else None)
        if hparams.keep_results:
            module.results.extend(inversions)

    @torch.no_grad()
    def _report(
        self,
        module: Any,
        pixels: torch.Tensor,
        z0: torch.Tensor,
        z_T: torch.Tensor,
        latent: torch.Tensor,
        cond: Any,
    ) -> tuple[list[dict[str, float]], torch.Tensor]:
        """Metrics and grids of finished images: `pixels`, their VAE latents `z0`, pivot ends `z_T`,
        final latents of the walk `latent` and source conditions `cond`."""
        ddim = None
        if module.hparams.ddim_baseline:
            with module.trainer.precision_plugin.forward_context():
                ddim = ddim_reconstruction(
                    module.denoiser, module.schedule, z_T, module.empty, cond, module.hparams.guidance_scale
                )
        # The final latent of the walk is the reconstruction: sampling from z_T with the frozen
        # embeddings is exactly the sequence of guided steps the walk just took.
        return reconstruction_report(module.vae, pixels, z0, latent, ddim)

    def _log_image(self, trainer: pl.Trainer, image_id: str, row: dict[str, float], grid: torch.Tensor | None) -> None:
        metrics = {f"reconstruction/{name}": value for name, value in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self.images_done)
            if grid is not None and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"grid/{image_id}", grid, self.images_done)
        self.images_done += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # Every rank gets here after the same number of epochs, whatever work it did, so the
        # gather cannot hang on a rank that finished early.
        self._finish_run(trainer, pl_module, *_gather(trainer, (self.rows, self.failures)))

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # Ctrl-C, or SIGTERM (a cluster preempting the job; Lightning raises it between batches):
        # every artifact finished so far is already on disk, so report them and say how to go on.
        # No gather: the other ranks may be gone, so each rank reports only what it knows.
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self._finish_run(trainer, pl_module, self.rows, self.failures, interrupted=True)

    def _finish_run(
        self,
        trainer: pl.Trainer,
        pl_module: Any,
        rows: list[dict[str, Any]],
        failures: list[dict[str, str]],
        interrupted: bool = False,
    ) -> None:
        """Rank 0 writes the dataset report and prints the summary."""
        if not trainer.is_global_zero:
            return
        plan = trainer.datamodule.plan if getattr(trainer, "datamodule", None) is not None else None
        if plan is not None:
            failures = [failure.to_json() for failure in plan.failures] + failures
            rows = rows + [_skipped_row(sample, artifact) for sample, artifact in plan.skipped]
        output_dir = pl_module.hparams.output_dir
        summary = write_report(output_dir, rows, failures) if output_dir is not None else summarize(rows)
        skipped = sum(row["status"] == "skipped" for row in rows)
        self.failed = len(failures)
        if interrupted:
            print(f"interrupted: {len(rows) - skipped} inverted; rerun the same command to finish", file=sys.stderr)
            return
        lines = [
            f"nti: {len(rows) - skipped} inverted, {skipped} skipped (already done), {len(failures)} failed"
            + (f"; report and failures in {output_dir}" if output_dir is not None else "")
        ]
        lines += [f"  failed: {failure['reason']}" for failure in failures[:10]]
        table = summary_table(summary) if summary else ""
        if table:
            lines.append(table)
        # The command line prints it; the Python API hands it back instead (`invert(...).report`).
        self.summary, self.report = summary, "\n".join(lines)
        if pl_module.print_summary:
            print(self.report)
        for logger in trainer.loggers if table else []:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("report/summary", table, 0)
                for method, values in summary.items():
                    for name, value in values.items():
                        logger.experiment.add_scalar(f"report/{method}/{name}", value, 0)


def _gather(trainer: pl.Trainer, local: Any) -> Any:
    """Rank 0 gets every rank's `(rows, failures)` concatenated; other ranks get their own."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return local
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, local)
    rows = [row for rank_rows, _ in gathered for row in rank_rows]
    failures = [failure for _, rank_failures in gathered for failure in rank_failures]
    return rows, failures


def _skipped_row(sample: ImageSample, artifact: str) -> dict[str, Any]:
    """The report row of an image a previous run inverted, from its artifact's header."""
    try:
        metadata = Inversion.read_metadata(artifact)
    except ArtifactError:  # removed or replaced since the run started: report it without numbers
        metadata = {"id": sample.id, "prompt": sample.prompt}
    return image_row(metadata, "skipped", artifact)


def _grid_picture(grid: torch.Tensor, min_side: int = 128) -> Image.Image:
    """The grid as a PNG-ready image, enlarged (nearest neighbour) when the model is small."""
    picture = to_pil(grid)
    scale = -(-min_side // picture.height)
    return picture if scale <= 1 else picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _metadata(module: Any, latent_shape: list[int]) -> dict[str, Any]:
    hparams = module.hparams
    return {
        "model": hparams.pretrained,
        "model_fingerprint": module.model_fingerprint,
        "method": hparams.method,
        **module.method_metadata,
        "scheduler_config": json.loads(json.dumps(module.scheduler_config, default=str)),
        "num_inference_steps": hparams.num_inference_steps,
        "guidance_scale": hparams.guidance_scale,
        "num_inner_steps": hparams.num_inner_steps,
        "early_stop_epsilon": hparams.early_stop_epsilon,
        "learning_rate": hparams.learning_rate,
        "image_size": module.resolution,
        "latent_shape": latent_shape,
        "text_shape": list(module.empty.embeddings.shape[1:]),
        **_conditioning_metadata(module.empty),
        "nti_lightning_version": __version__,
    }


def _conditioning_metadata(empty: Any) -> dict[str, Any]:
    """SDXL's extra condition: the pooled embedding's width and the time ids of every image."""
    if not empty.has_pooled:
        return {}
    return {"pooled_shape": list(empty.pooled.shape[1:]), "time_ids": [float(v) for v in empty.time_ids[0].tolist()]}
