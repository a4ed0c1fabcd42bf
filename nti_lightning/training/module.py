"""`NullTextInversion`: the null-text optimisation as a LightningModule.

Its only parameter is the current timestep's null embedding, `[B, 77, D]` fp32. Its "dataset" is
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
from diffusers import StableDiffusionPipeline

from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.null_text import TimestepProblem, keep_inactive, objective
from nti_lightning.inversion.trajectory import NullTextTrajectory
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.fingerprint import pipeline_fingerprint
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.text import encode_prompts

#: Inversion methods: the paper's, and the two baselines it is compared with.
METHODS = ("null_text", "negative_prompt", "ddim")

# The UNet, VAE and text encoder are frozen on purpose; Lightning would warn about them each fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class NullTextInversion(pl.LightningModule):
    """Null-text Inversion (Mokady et al. 2022) of batches of images.

    Args:
        pretrained (`str`, defaults to "tiny"): the Stable Diffusion model: a hub id (e.g.
            "CompVis/stable-diffusion-v1-4"), a diffusers folder, a single-file `.safetensors`
            checkpoint, or a built-in name ("tiny", "tiny-v").
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
            Miyake et al. 2023); "ddim" (the pivot alone, sampled back with ∅). All three write
            the same artifacts and report, so they can be compared on one dataset.
        early_exit (`bool`, defaults to True): end a timestep's inner loop once every image of
            the batch has stopped (one device-to-host read of the stop mask per iteration).
            False runs all N iterations, masked per image, with no host synchronisation inside
            the loop (for CUDA graphs); the results are the same either way.
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
        method: Literal["null_text", "negative_prompt", "ddim"] = "null_text",
        early_exit: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        allow_model_mismatch: bool = False,
    ) -> None:
        super().__init__()
        if num_inference_steps < 1 or num_inner_steps < 1:
            raise OptionError(
                f"model.num_inference_steps and model.num_inner_steps must be positive, got {num_inference_steps} and {num_inner_steps}"
            )
        if method not in METHODS:
            raise OptionError(f"model.method must be one of {METHODS}, got {method!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.unet: Any = None
        self.vae: Any = None
        self.text_encoder: Any = None
        self.tokenizer: Any = None
        self.schedule: Optional[DDIMSchedule] = None
        self.model_fingerprint: Optional[str] = None  # of the attached weights, recorded in artifacts
        self.scheduler_config: dict[str, Any] = {}
        self.null_embedding: Optional[torch.nn.Parameter] = None
        self.trajectory: Optional[NullTextTrajectory] = None
        self.problem: Optional[TimestepProblem] = None
        self.empty_embedding: Optional[torch.Tensor] = None
        self.results: list[Inversion] = []
        #: Images per trajectory: the embedding's batch dimension, set by the data module before
        #: the model is configured so that it never changes shape during a run (DDP wraps it).
        self.batch_slots = 1
        self.idle = False  # this rank has nothing to optimise in the current iteration
        self._compiled_unet: Any = None
        self.release_after_fit = False  # set by the Python API, which keeps the pipeline itself

    # ----------------------------------------------------------------------------- the model
    def attach_pipeline(self, pipeline: StableDiffusionPipeline) -> "NullTextInversion":
        """Uses the components of an already loaded pipeline (the Python API's entry point)."""
        for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            part.requires_grad_(False).eval()  # backward reaches the embedding only
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.model_fingerprint = pipeline_fingerprint(pipeline)
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.schedule = DDIMSchedule.from_scheduler_config(self.scheduler_config, self.hparams.num_inference_steps)
        # The frozen networks are the same on every rank: DDP need not broadcast nor watch them.
        self._ddp_params_and_buffers_to_ignore = [
            f"{prefix}.{name}"
            for prefix in ("unet", "vae", "text_encoder")
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
        shape = (self.batch_slots, self.tokenizer.model_max_length, self.unet.config.cross_attention_dim)
        if self.null_embedding is None or tuple(self.null_embedding.shape) != shape:
            self.null_embedding = torch.nn.Parameter(torch.zeros(shape, device=self.device))

    @property
    def denoiser(self) -> Any:
        """The UNet every step calls: compiled when `compile` is set."""
        return self._compiled_unet if self._compiled_unet is not None else self.unet

    def on_train_end(self) -> None:
        # Runs after the callbacks' on_train_end (the report) and before Lightning's teardown.
        if self.release_after_fit:
            self.unet = self.vae = self.text_encoder = None
            object.__setattr__(self, "_compiled_unet", None)

    @property
    def optimises(self) -> bool:
        """Whether the method tunes the null embedding (only "null_text" does)."""
        return self.hparams.method == "null_text"

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
            "num_inference_steps": hparams.num_inference_steps,
            "guidance_scale": hparams.guidance_scale,
            "num_inner_steps": hparams.num_inner_steps,
            "early_stop_epsilon": hparams.early_stop_epsilon,
            "learning_rate": hparams.learning_rate,
        }

    @property
    def resolution(self) -> int:
        """Image side in pixels the model works at."""
        self.configure_model()
        return vae_codec.resolution(self.vae, self.unet.config.sample_size)

    def train(self, mode: bool = True) -> "NullTextInversion":
        # Lightning puts the module in train mode; the frozen networks stay in eval mode.
        super().train(mode)
        for part in (self.unet, self.vae, self.text_encoder):
            if part is not None:
                part.eval()
        return self

    def configure_callbacks(self) -> list[pl.Callback]:
        from nti_lightning.training.callback import NullTextWalkCallback
        from nti_lightning.training.progress import InversionProgressBar

        callbacks: list[pl.Callback] = [NullTextWalkCallback()]
        if self._trainer is not None and self.trainer.progress_bar_callback is not None:
            callbacks.append(InversionProgressBar())
        return callbacks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One Adam, emptied and re-rated at every timestep: the reference's fresh Adam per step.
        return torch.optim.Adam([self.null_embedding], lr=self.hparams.learning_rate)

    # ------------------------------------------------------------------------ text and batches
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """`[len(prompts), 77, D]` text embeddings on the module's device."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts).to(self.device)

    def reset_null_embedding(self, cond_embeddings: torch.Tensor) -> None:
        """Sets the parameter for a new batch, in place: ∅, or the prompts' own embeddings `C`
        for the negative-prompt method."""
        if self.empty_embedding is None:
            self.empty_embedding = self.encode([""])
        start = cond_embeddings if self.hparams.method == "negative_prompt" else self.empty_embedding
        with torch.no_grad():
            self.null_embedding.copy_(start.expand_as(self.null_embedding))

    # ------------------------------------------------------------------ one inner iteration
    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> Optional[int]:
        # The early stop itself is the device-side mask of each image (exact per image); this
        # only saves the compute once a whole batch has stopped, at once for the methods without
        # optimisation, and for an empty batch (no problem at all).
        self.idle = self.problem is None or (self.hparams.early_exit and not bool(self.problem.active.any()))
        if self.idle and self.trainer.world_size == 1:
            return -1  # ends the epoch: this timestep is done
        # Under DDP Lightning broadcasts at every batch: a rank that ended its epoch early would
        # leave the others waiting. An idle rank walks the same batches without computing.
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Optional[torch.Tensor]:
        if self.idle:
            return None
        problem = self.problem
        optimizer = self.optimizers()
        updated = problem.active.clone()
        losses = problem.losses(self.schedule, self.denoiser, self.null_embedding, self.hparams.guidance_scale)
        loss = objective(losses, updated)
        # Every rank inverts its own images: gradients must not be averaged across ranks.
        sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        with sync():
            self.manual_backward(loss)
        before = self.null_embedding.detach().clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keep_inactive(self.null_embedding, before, updated)
        problem.record(losses)
        return loss.detach()
