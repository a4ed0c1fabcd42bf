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
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from diffusers import StableDiffusionPipeline

from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.null_text import TimestepProblem, keep_inactive, objective
from nti_lightning.inversion.trajectory import NullTextTrajectory
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.text import encode_prompts

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
    ) -> None:
        super().__init__()
        if num_inference_steps < 1 or num_inner_steps < 1:
            raise ValueError("num_inference_steps and num_inner_steps must be positive")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.unet: Any = None
        self.vae: Any = None
        self.text_encoder: Any = None
        self.tokenizer: Any = None
        self.schedule: Optional[DDIMSchedule] = None
        self.scheduler_config: dict[str, Any] = {}
        self.null_embedding: Optional[torch.nn.Parameter] = None
        self.trajectory: Optional[NullTextTrajectory] = None
        self.problem: Optional[TimestepProblem] = None
        self.empty_embedding: Optional[torch.Tensor] = None
        self.results: list[Inversion] = []

    # ----------------------------------------------------------------------------- the model
    def attach_pipeline(self, pipeline: StableDiffusionPipeline) -> "NullTextInversion":
        """Uses the components of an already loaded pipeline (the Python API's entry point)."""
        for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            part.requires_grad_(False).eval()  # backward reaches the embedding only
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.schedule = DDIMSchedule.from_scheduler_config(self.scheduler_config, self.hparams.num_inference_steps)
        width = self.unet.config.cross_attention_dim
        self.null_embedding = torch.nn.Parameter(torch.zeros(1, self.tokenizer.model_max_length, width))
        return self

    def configure_model(self) -> None:
        if self.unet is None:
            self.attach_pipeline(load_pipeline(self.hparams.pretrained))

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

        return [NullTextWalkCallback()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One Adam, emptied and re-rated at every timestep: the reference's fresh Adam per step.
        return torch.optim.Adam([self.null_embedding], lr=self.hparams.learning_rate)

    # ------------------------------------------------------------------------ text and batches
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """`[len(prompts), 77, D]` text embeddings on the module's device."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts).to(self.device)

    def reset_null_embedding(self, batch_size: int) -> None:
        """Sets the parameter to ∅ for a new batch (its shape follows the batch)."""
        if self.empty_embedding is None:
            self.empty_embedding = self.encode([""])
        with torch.no_grad():
            self.null_embedding.data = self.empty_embedding.expand(batch_size, -1, -1).clone().float()

    # ------------------------------------------------------------------ one inner iteration
    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> Optional[int]:
        # -1 ends the epoch (this timestep) once every image of the batch has stopped early.
        if not bool(self.problem.active.any()):
            return -1
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        problem = self.problem
        optimizer = self.optimizers()
        updated = problem.active.clone()
        losses = problem.losses(self.schedule, self.unet, self.null_embedding, self.hparams.guidance_scale)
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
