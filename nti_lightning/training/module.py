"""`NullTextInversion`: the null-text optimisation as a LightningModule.

Its parameter is the current timestep's null condition: the embedding `[B, 77, D]` fp32, and for
SDXL the pooled embedding `[B, P]` beside it (one Adam tunes both). Its "dataset" is
the walk over the pivot trajectory from T to 1 (`nti_lightning.data.walk`): one epoch per
timestep, one training batch per inner Adam iteration. `training_step` is one inner iteration;
the step boundaries (pivot, fresh Adam, freezing, the guided advance, artifacts) live in the
`NullTextWalkCallback` that the module brings along. The maths is in `nti_lightning.inversion`.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch

from nti_lightning.diffusion.condition import Condition
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import NULL_DTYPES, Inversion
from nti_lightning.inversion.methods import MethodName, method_named
from nti_lightning.inversion.null_text import TimestepProblem, keep_inactive, objective
from nti_lightning.inversion.pivot_store import PivotStore
from nti_lightning.inversion.row_adam import RowAdam
from nti_lightning.inversion.slots import SlotWalk
from nti_lightning.inversion.trajectory import NullTextTrajectory
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.fingerprint import pipeline_fingerprint
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.pipelines import Pipeline
from nti_lightning.models.text import PromptEncoder

#: How the images of a batch share UNet calls (see `NullTextInversion`'s `scheduling`).
SCHEDULINGS = ("continuous", "lockstep")

# The UNet, VAE and text encoder are frozen on purpose; Lightning would warn about them each fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class NullTextInversion(pl.LightningModule):
    """Null-text Inversion (Mokady et al. 2022) of batches of images.

    Args:
        pretrained (`str`, defaults to "tiny"): the Stable Diffusion model (SD 1.x, 2.x or XL): a
            hub id (e.g. "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-xl-base-1.0"),
            a diffusers folder, a single-file `.safetensors` checkpoint, or a built-in name
            ("tiny", "tiny-v", "tiny-xl", "shapes", "sd15-random", "sdxl-random").
        num_inference_steps (`int`, defaults to 50): T, DDIM steps.
        guidance_scale (`float`, defaults to 7.5): w, classifier-free guidance scale.
        num_inner_steps (`int`, defaults to 10): N, most Adam iterations per timestep.
        early_stop_epsilon (`float`, defaults to 1e-5): ε; an image stops at step i once its loss
            is below `ε + i·2e-5`.
        learning_rate (`float`, defaults to 1e-2): Adam's rate at step 0, decayed as `lr·(1 - i/100)`.
        output_dir (`str`, *optional*, defaults to "inversions"): where `<id>.safetensors` and the
            `<id>.png` grids are written; `None` writes nothing.
        save_grids (`bool`, defaults to True): write and log the comparison grid of each image.
        ddim_baseline (`bool`, defaults to True): also sample the plain DDIM reconstruction at w
            for the grid and metrics (about 15% more UNet calls).
        keep_results (`bool`, defaults to False): keep every `Inversion` in `self.results` (the
            Python API does; a dataset run need not hold them all in memory).
        reuse_cond_output (`bool`, defaults to False): advance each step with the conditional
            output computed at its start instead of a fresh two-branch UNet call; one UNet
            forward less per step, equal maths, but no longer bit-identical to the reference.
        method (`str`, defaults to "null_text"): "null_text" (the paper); "negative_prompt" (the
            source prompt's embedding as the unconditional one at every step, no optimisation,
            Miyake et al. 2023); "ddim" (the pivot alone, sampled back with ∅); "direct" (Direct
            Inversion, Ju et al. 2024: the pivot, with ∅, and per step the offset
            `z*_{t-1} - step(z*_t)` at w that the source branch adds while editing, so that it
            retraces the pivot). All write the same artifacts and report, so they can be
            compared on one dataset. "ddpm": edit-friendly DDPM inversion (Huberman-Spiegelglas
            et al. 2024: independently noised x_t and the noise maps that land on them, edits
            from `skip` steps in with the maps added; `nti_lightning.inversion.methods.ddpm`);
            "proxnpi" (negative-prompt inversion with proximal guidance at edit time, Han et al.
            2023); "edict" (EDICT's exactly invertible coupled latents, Wallace et al. 2023).
        method_options (`dict`, *optional*): the method's settings over its defaults, e.g.
            `{skip: 12, source_guidance_scale: 1.0}` for "ddpm"; recorded in every artifact. A
            setting the method does not have, or one out of range, is refused.
        early_exit (`bool`, defaults to True): end a timestep's inner loop once every image of
            the batch has stopped (one device-to-host read of the stop mask per iteration).
            False runs all N iterations, masked per image, with no host synchronisation inside
            the loop (for CUDA graphs); the results are the same either way. With "continuous"
            scheduling, False puts every slot through every UNet call (the inner iteration, the
            advance, the conditional outputs, the pivots; idle slots masked), so each kind of
            call keeps one shape.
        channels_last (`bool`, defaults to False): keep the UNet's weights in channels-last
            memory format (faster convolutions on recent GPUs; changes the pipeline in place).
        compile (`bool`, defaults to False): run the UNet through `torch.compile` (shapes are
            fixed for a whole run: the batch is always `slots` images). The pipeline itself is
            left uncompiled.
        compile_mode (`str`, *optional*): `torch.compile` mode, e.g. "reduce-overhead" for CUDA
            graphs (use with `early_exit=False`: a graph replays best without host reads).
        allow_model_mismatch (`bool`, defaults to False): on a resumed run, count artifacts made
            with other weights of the same model reference as done (refused otherwise: see
            `nti_lightning.models.fingerprint`).
        scheduling (`str`, defaults to "continuous"): how a batch's images share UNet calls.
            "continuous": B slots, each image at its own timestep and inner iteration; a slot
            whose image stops moves on at once and a finished image's slot takes the next
            image, so no UNet row is spent on a stopped image (`nti_lightning.inversion.slots`).
            "lockstep": the B images of a batch walk their timesteps together (one epoch per
            timestep), the batch ending each timestep when its slowest image stops.
            Same results either way (each image gets what it gets alone).
        sync_every (`int`, defaults to 8): with "continuous" under DDP, the ranks agree every
            this many training batches whether all are done (one small all-reduce); a rank done
            earlier walks idle batches until then.
        gradient_checkpointing (`bool`, defaults to False): recompute the UNet's activations in
            the backward pass instead of keeping them (the UNet's own checkpointing): about a
            third more compute per inner iteration for a fraction of the activation memory (SDXL
            at 1024 px on a 24 GB card). Same results.
        null_dtype (`str`, defaults to "float32"): how the artifacts store the null embeddings;
            "float16" halves an SD file for a reconstruction within 0.05 dB of the fp32 one
            (docs/ARTIFACTS.md). Optimisation is fp32 either way.
        pivot_dir (`str`, *optional*): keep each image's DDIM pivot in this folder and use the one
            stored there when it fits (same model, precision, schedule, prompt and image): runs of
            several methods on the same images compute each pivot once (`nti bench` does). Same
            results as without it, up to the float rounding of another batch composition.
    """

    def __init__(
        self,
        pretrained: str = "tiny",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_inner_steps: int = 10,
        early_stop_epsilon: float = 1e-5,
        learning_rate: float = 1e-2,
        output_dir: Optional[str] = "inversions",
        save_grids: bool = True,
        ddim_baseline: bool = True,
        keep_results: bool = False,
        reuse_cond_output: bool = False,
        method: MethodName = "null_text",
        method_options: Optional[dict[str, Any]] = None,
        early_exit: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        allow_model_mismatch: bool = False,
        gradient_checkpointing: bool = False,
        scheduling: Literal["continuous", "lockstep"] = "continuous",
        sync_every: int = 8,
        null_dtype: Literal["float32", "float16"] = "float32",
        pivot_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if num_inference_steps < 1 or num_inner_steps < 1:
            raise OptionError(
                f"model.num_inference_steps and model.num_inner_steps must be positive, got {num_inference_steps} and "
                f"{num_inner_steps}"
            )
        self.method = method_named(method, method_options)
        self.method.start_step(num_inference_steps)  # a start past the last step is refused now
        if null_dtype not in NULL_DTYPES:
            raise OptionError(f"model.null_dtype must be one of {sorted(NULL_DTYPES)}, got {null_dtype!r}")
        if scheduling not in SCHEDULINGS:
            raise OptionError(f"model.scheduling must be one of {SCHEDULINGS}, got {scheduling!r}")
        if sync_every < 1:
            raise OptionError(f"model.sync_every must be positive, got {sync_every}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.unet: Any = None
        self.vae: Any = None
        self.text_encoder: Any = None
        self.text_encoder_2: Any = None  # SDXL's second text encoder
        self.tokenizer: Any = None
        self.prompt_encoder: Optional[PromptEncoder] = None
        self.schedule: Optional[DDIMSchedule] = None
        self.model_fingerprint: Optional[str] = None  # of the attached weights, recorded in artifacts
        self.scheduler_config: dict[str, Any] = {}
        self.null_embedding: Optional[torch.nn.Parameter] = None
        self.null_pooled_embedding: Optional[torch.nn.Parameter] = None  # SDXL only
        self.trajectory: Optional[NullTextTrajectory] = None
        self.slot_walk: Optional[SlotWalk] = None  # "continuous" scheduling's state
        self.all_done = False  # "continuous": this rank has no image left to walk
        self.images_done = 0  # "continuous": images this rank finished
        self.images_done_all = 0  # "continuous": images all ranks finished, as last agreed
        self.problem: Optional[TimestepProblem] = None
        self.empty: Optional[Condition] = None  # ∅: the pipeline's own unconditional input, one row
        self.results: list[Inversion] = []
        self.pivot_store: Optional[PivotStore] = None  # with pivot_dir: set when the run starts
        #: Images per trajectory: the embedding's batch dimension, set by the data module before
        #: the model is configured so that it never changes shape during a run (DDP wraps it).
        self.batch_slots = 1
        self.idle = False  # this rank has nothing to optimise in the current iteration
        self._compiled_unet: Any = None
        self.release_after_fit = False  # set by the Python API, which keeps the pipeline itself
        self.print_summary = True  # the command line prints the run's summary; the Python API returns it

    # ----------------------------------------------------------------------------- the model
    def attach_pipeline(self, pipeline: Pipeline) -> "NullTextInversion":
        """Uses the components of an already loaded SD or SDXL pipeline (the Python API's entry point)."""
        text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder, text_encoder_2):
            if part is not None:
                part.requires_grad_(False).eval()  # backward reaches the null condition only
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = pipeline.tokenizer
        self.prompt_encoder = PromptEncoder.of(pipeline)
        self.model_fingerprint = pipeline_fingerprint(pipeline)
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.schedule = DDIMSchedule.from_scheduler_config(self.scheduler_config, self.hparams.num_inference_steps)
        # The frozen networks are the same on every rank: DDP need not broadcast nor watch them.
        self._ddp_params_and_buffers_to_ignore = [
            f"{prefix}.{name}"
            for prefix in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(self, prefix) is not None
            for name, _ in [*getattr(self, prefix).named_parameters(), *getattr(self, prefix).named_buffers()]
        ]
        return self

    def configure_model(self) -> None:
        if self.unet is None:
            self.attach_pipeline(load_pipeline(self.hparams.pretrained))
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.hparams.compile and self._compiled_unet is None:
            # Kept off the module tree (plain attribute): the parameters stay registered once.
            object.__setattr__(self, "_compiled_unet", torch.compile(self.unet, mode=self.hparams.compile_mode))
        if self.hparams.gradient_checkpointing and not self.unet.is_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        shape = (self.batch_slots, self.prompt_encoder.tokens, self.unet.config.cross_attention_dim)
        if self.null_embedding is None or tuple(self.null_embedding.shape) != shape:
            self.null_embedding = torch.nn.Parameter(torch.zeros(shape, device=self.device))
        pooled = self.prompt_encoder.pooled_width
        if pooled is not None and (
            self.null_pooled_embedding is None or self.null_pooled_embedding.shape[0] != self.batch_slots
        ):
            self.null_pooled_embedding = torch.nn.Parameter(torch.zeros(self.batch_slots, pooled, device=self.device))

    @property
    def denoiser(self) -> Any:
        """The UNet every step calls: compiled when `compile` is set."""
        return self._compiled_unet if self._compiled_unet is not None else self.unet

    def on_train_end(self) -> None:
        # Runs after the callbacks' on_train_end (the report) and before Lightning's teardown.
        if self.release_after_fit:
            self.unet = self.vae = self.text_encoder = self.text_encoder_2 = None
            object.__setattr__(self, "_compiled_unet", None)

    def open_pivot_store(self) -> Optional[PivotStore]:
        """The run's `PivotStore` under `pivot_dir` (None without one): pivots depend on the
        weights, the precision the UNet runs under and the schedule."""
        if self.hparams.pivot_dir is None:
            self.pivot_store = None
        else:
            context = f"{self.model_fingerprint}|{self.trainer.precision}"
            self.pivot_store = PivotStore(self.hparams.pivot_dir, context, self.schedule)
        return self.pivot_store

    @property
    def continuous(self) -> bool:
        return self.hparams.scheduling == "continuous"

    @property
    def optimises(self) -> bool:
        """Whether the method tunes the null embedding (Null-text does; see `InversionMethod`)."""
        return self.method.optimises

    @property
    def inner_iterations(self) -> int:
        """Training batches per timestep: N, or 1 for the methods without optimisation."""
        return self.hparams.num_inner_steps if self.optimises else 1

    def run_settings(self) -> dict[str, Any]:
        """The settings an existing artifact must share to count as this run's result."""
        hparams = self.hparams
        self.configure_model()  # the weights' fingerprint needs the model
        fingerprint = {} if hparams.allow_model_mismatch else {"model_fingerprint": self.model_fingerprint}
        return {
            **fingerprint,
            "model": hparams.pretrained,
            "method": hparams.method,
            **self.method_metadata,
            "num_inference_steps": hparams.num_inference_steps,
            "guidance_scale": hparams.guidance_scale,
            "num_inner_steps": hparams.num_inner_steps,
            "early_stop_epsilon": hparams.early_stop_epsilon,
            "learning_rate": hparams.learning_rate,
        }

    @property
    def method_metadata(self) -> dict[str, Any]:
        """`{"method_options": ...}` for a method with settings (every one recorded), else `{}`."""
        return {"method_options": dict(self.method.options)} if self.method.options else {}

    @property
    def resolution(self) -> int:
        """Image side in pixels the model works at."""
        self.configure_model()
        return vae_codec.resolution(self.vae, self.unet.config.sample_size)

    def train(self, mode: bool = True) -> "NullTextInversion":
        # Lightning puts the module in train mode; the frozen networks stay in eval mode.
        super().train(mode)
        for part in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if part is not None:
                part.eval()
        return self

    def configure_callbacks(self) -> list[pl.Callback]:
        from nti_lightning.training.callback import NullTextWalkCallback
        from nti_lightning.training.progress import InversionProgressBar
        from nti_lightning.training.slot_callback import SlotWalkCallback

        callbacks: list[pl.Callback] = [SlotWalkCallback() if self.continuous else NullTextWalkCallback()]
        if self._trainer is not None and self.trainer.progress_bar_callback is not None:
            callbacks.append(InversionProgressBar())
        return callbacks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One Adam, emptied and re-rated at every timestep: the reference's fresh Adam per step.
        # For SDXL it holds both tensors of the null condition, as the specification's one Adam.
        # Continuous batching needs one fresh Adam per slot and step instead: per-row state.
        if self.continuous:
            return RowAdam(self.null_parameters())
        return torch.optim.Adam(self.null_parameters(), lr=self.hparams.learning_rate)

    def null_parameters(self) -> list[torch.nn.Parameter]:
        """The tensors the optimisation tunes: the null embedding, and SDXL's pooled one."""
        return [p for p in (self.null_embedding, self.null_pooled_embedding) if p is not None]

    def null_condition(self) -> Condition:
        """The current null condition φ of the batch (the parameters, with the batch's time ids)."""
        return self.trajectory.cond.with_tunable(self.null_embedding, self.null_pooled_embedding)

    # ------------------------------------------------------------------------ text and batches
    def encode(self, prompts: list[str]) -> Condition:
        """The prompts' conditions (`[len(prompts), 77, D]` embeddings, SDXL's pooled ones and time
        ids) on the module's device."""
        return self.prompt_encoder.encode(prompts).to(self.device)

    def reset_null_embedding(self, cond: Condition) -> None:
        """Sets the parameters for a new batch, in place, where the method starts each step: ∅
        (the pipeline's own unconditional input), or the prompts' own condition `C` for the
        negative-prompt method."""
        if self.empty is None:
            self.empty = self.prompt_encoder.null().to(self.device)
        start = self.method.start_condition(cond, self.empty)
        with torch.no_grad():
            for param, value in zip(self.null_parameters(), start.tunable()):
                param.copy_(value.expand_as(param))

    # ------------------------------------------------------------------ one inner iteration
    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> Optional[int]:
        if self.continuous:
            return self._continuous_batch_start(batch_idx)
        # The early stop itself is the device-side mask of each image (exact per image); this
        # only saves the compute once a whole batch has stopped, at once for the methods without
        # optimisation, and for an empty batch (no problem at all).
        self.idle = self.problem is None or (self.hparams.early_exit and not bool(self.problem.active.any()))
        if self.idle and self.trainer.world_size == 1:
            return -1  # ends the epoch: this timestep is done
        # Under DDP Lightning broadcasts at every batch: a rank that ended its epoch early would
        # leave the others waiting. An idle rank walks the same batches without computing.
        return None

    def _continuous_batch_start(self, batch_idx: int) -> Optional[int]:
        walk = self.slot_walk
        self.idle = walk is None or not walk.optimising_slots()
        if self.trainer.world_size == 1:
            return -1 if self.all_done else None
        # Every rank must run the same training batches: they agree every `sync_every` batches,
        # with one all-reduce of "done" flags, and end together once all are done.
        if batch_idx % self.hparams.sync_every == 0:
            state = torch.tensor([float(self.all_done), float(self.images_done)], device=self.device)
            ranks_done, images_done = self.trainer.strategy.reduce(state, reduce_op="sum").tolist()
            self.images_done_all = int(images_done)
            if int(ranks_done) == self.trainer.world_size:
                return -1
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Optional[torch.Tensor]:
        if self.idle:
            return None
        if self.continuous:
            return self._continuous_step()
        problem = self.problem
        optimizer = self.optimizers()
        updated = problem.active.clone()
        losses = problem.losses(self.schedule, self.denoiser, self.null_condition(), self.hparams.guidance_scale)
        loss = objective(losses, updated)
        # Every rank inverts its own images: gradients must not be averaged across ranks.
        sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        with sync():
            self.manual_backward(loss)
        params = self.null_parameters()
        before = [param.detach().clone() for param in params]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keep_inactive(params, before, updated)
        problem.record(losses)
        return loss.detach()

    def _continuous_step(self) -> torch.Tensor:
        """One inner iteration of every optimising slot, each at its own timestep (the callback
        advances the slots that stopped, after the batch)."""
        walk = self.slot_walk
        slots = walk.optimising_slots()
        # With early_exit=False every slot goes through the UNet in every batch, the ones not
        # optimising (an empty slot at the end of the run) masked out: one fixed shape for
        # torch.compile and CUDA graphs. Otherwise only the optimising slots are computed.
        rows = walk.call_rows(slots)
        losses = walk.losses(self.denoiser, rows)
        mask = walk.optimising[rows].to(losses.device)
        loss = (losses * mask.to(losses.dtype)).sum()  # each slot's gradient is its own MSE's
        sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        with sync():
            self.manual_backward(loss)
        optimizer = self.optimizers()
        optimizer.step(rows=slots)
        optimizer.zero_grad(set_to_none=True)
        walk.record(slots, losses[mask])
        return loss.detach()
