"""The Python API: `invert` images, `reconstruct` them from their inversion.

`invert` runs the same LightningModule as `nti fit`, through a `Trainer` built here, so a
notebook gets exactly what the command line gets.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from PIL import Image

from nti_lightning.data.datamodule import InversionDataModule
from nti_lightning.data.images import to_pil
from nti_lightning.editing.edit import edit_latents
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.fingerprint import model_reference
from nti_lightning.models.pipelines import Pipeline
from nti_lightning.training.callback import NullTextWalkCallback
from nti_lightning.training.module import NullTextInversion
from nti_lightning.training.progress import ProgressHook, WalkProgress

ImageInput = Union[Image.Image, str]


class Inversions(list):
    """The `Inversion`s of one `invert` call, in input order, with the run's summary.

    Attributes:
        summary (`dict`): per method, the means over the images (psnr, ssim, inner iterations...).
        report (`str`): the summary as `nti fit` prints it (counts, failures, the table).
    """

    def __init__(self, inversions: Sequence[Inversion], summary: dict[str, Any], report: str) -> None:
        super().__init__(inversions)
        self.summary = summary
        self.report = report


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up and end-of-fit messages held back: a notebook sees the bar alone."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def invert(
    pipeline: Pipeline,
    images: Union[ImageInput, Sequence[ImageInput]],
    prompts: Union[str, Sequence[str]],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    learning_rate: float = 1e-2,
    batch_size: int = 4,
    precision: str = "32-true",
    accelerator: str = "auto",
    output_dir: Optional[str] = None,
    ids: Optional[Sequence[str]] = None,
    progress_bar: bool = True,
    method: str = "null_text",
    method_options: Optional[dict[str, Any]] = None,
    reuse_cond_output: bool = False,
    early_exit: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: Optional[str] = None,
    gradient_checkpointing: bool = False,
    scheduling: str = "continuous",
    null_dtype: str = "float32",
    on_progress: Optional[Callable[[WalkProgress], None]] = None,
    pivot_dir: Optional[str] = None,
) -> Inversions:
    """Null-text inversion of `images` with their source `prompts`.

    Nothing is printed but the progress: the summary `nti fit` prints comes back as the result's
    `report` (and `summary`).

    Args:
        pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`): any SD 1.x/2.x or SDXL
            pipeline (its scheduler config is used for the DDIM schedule; its weights are not
            changed).
        images (PIL image, path, or a sequence of them): centre-cropped and resized to the model's
            resolution.
        prompts (`str` or sequence of `str`): one prompt for all images, or one per image.
        num_inference_steps (`int`, defaults to 50): T.
        guidance_scale (`float`, defaults to 7.5): w.
        num_inner_steps (`int`, defaults to 10): N.
        early_stop_epsilon (`float`, defaults to 1e-5): ε of the per-image early stop.
        learning_rate (`float`, defaults to 1e-2): Adam's rate at step 0.
        batch_size (`int`, defaults to 4): images optimised together; results do not depend on it.
        precision (`str`, defaults to "32-true"): "32-true", "bf16-mixed" or "16-mixed".
        accelerator (`str`, defaults to "auto"): Lightning accelerator (one device is used).
        output_dir (`str`, *optional*): also write `<id>.safetensors` and grid PNGs there.
        ids (sequence of `str`, *optional*): names of the images (default: file stems or image_<i>).
        progress_bar (`bool`, defaults to True): show the images done (a live bar on a terminal
            or in a notebook, a line every 30 s elsewhere); False shows nothing.
        method (`str`, defaults to "null_text"): or "negative_prompt" / "ddim" / "direct" (Direct
            Inversion) / "ddpm" (edit-friendly DDPM) / "proxnpi" / "edict", the methods it is compared with
            (`nti_lightning.inversion.methods.METHODS`).
        method_options (`dict`, *optional*): the method's settings over its defaults (e.g.
            `{"skip": 12}` for "ddpm"); see `NullTextInversion`.
        reuse_cond_output (`bool`, defaults to False): advance with the step's conditional
            output instead of a fresh two-branch UNet call (faster; float-level differences).
        early_exit (`bool`, defaults to True): end a step once all images stopped; False never
            reads the stop mask on the host (same results).
        channels_last (`bool`, defaults to False): channels-last UNet weights (GPU speed).
        compile (`bool`, defaults to False): `torch.compile` the UNet for this run.
        compile_mode (`str`, *optional*): `torch.compile` mode ("reduce-overhead": CUDA graphs).
        gradient_checkpointing (`bool`, defaults to False): the UNet's gradient checkpointing for
            this run (less memory, more compute; same results); the pipeline is left as it was.
        scheduling (`str`, defaults to "continuous"): each of the `batch_size` slots at its own
            timestep, so an image that stops early moves on at once and a finished image's slot
            takes the next image; "lockstep" walks a batch's images through their timesteps
            together (same results; lockstep computes stopped images until their batch is done).
        null_dtype (`str`, defaults to "float32"): how files in `output_dir` store the null
            embeddings; "float16" halves them (see `Inversion.save`).
        on_progress (callable, *optional*): called with a `WalkProgress` (images done, step,
            timestep, inner iteration, fraction done) when the walk starts and after every inner
            iteration, for a progress display of one's own (a web page, a GUI). An exception it
            raises stops the run and is raised by `invert`: a way to cancel from another thread.
        pivot_dir (`str`, *optional*): keep the images' DDIM pivots there and reuse those that
            fit: inverting the same images with another method then skips the pivot.

    Returns:
        `Inversions`: a list of one `Inversion` per image, in input order, with `summary` and `report`.
    """
    images = [images] if isinstance(images, (Image.Image, str)) else list(images)
    prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    data = InversionDataModule(
        images=images, prompts=prompt_list, ids=list(ids) if ids else None, batch_size=batch_size, strict=True
    )
    module = NullTextInversion(
        pretrained=model_reference(pipeline),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_inner_steps=num_inner_steps,
        early_stop_epsilon=early_stop_epsilon,
        learning_rate=learning_rate,
        output_dir=output_dir,
        save_grids=output_dir is not None,
        ddim_baseline=output_dir is not None,
        keep_results=True,
        method=method,
        method_options=method_options,
        reuse_cond_output=reuse_cond_output,
        early_exit=early_exit,
        channels_last=channels_last,
        compile=compile,
        compile_mode=compile_mode,
        gradient_checkpointing=gradient_checkpointing,
        scheduling=scheduling,
        null_dtype=null_dtype,
        pivot_dir=pivot_dir,
    ).attach_pipeline(pipeline)
    # Lightning moves the module to the CPU when fit ends: gigabytes each way per call for SD on
    # a GPU. The module lets go of the pipeline's networks first instead.
    module.release_after_fit = True
    module.print_summary = False
    device = pipeline.unet.device
    checkpointing = pipeline.unet.is_gradient_checkpointing
    try:
        with _quiet_lightning():
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=1,
                precision=precision,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress_bar,
                use_distributed_sampler=False,
                num_sanity_val_steps=0,
                max_epochs=-1,  # the walk sets its own length
                callbacks=[ProgressHook(on_progress)] if on_progress is not None else None,
            )
            trainer.fit(module, datamodule=data)
    finally:
        # Should fit fail before its end, Lightning may still have moved the networks to the CPU.
        pipeline.to(device)
        if gradient_checkpointing and not checkpointing:
            pipeline.unet.disable_gradient_checkpointing()
    # Continuous scheduling finishes images in the order they converge: give them back in input order.
    order = {sample.id: index for index, sample in enumerate(data.samples)}
    walk = next(callback for callback in trainer.callbacks if isinstance(callback, NullTextWalkCallback))
    results = sorted(module.results, key=lambda inversion: order[inversion.metadata["id"]])
    return Inversions(results, walk.summary, walk.report)



def reconstruction_latents(
    pipeline: Pipeline,
    inversion: Inversion,
    prompt: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    allow_model_mismatch: bool = False,
) -> torch.Tensor:
    """`[1, C, h, w]` latent at t = 0 sampled from `inversion` (see `reconstruct`)."""
    # A reconstruction is an edit with the source prompt and no attention control.
    return edit_latents(
        pipeline,
        inversion,
        [prompt or inversion.prompt],
        guidance_scale=inversion.guidance_scale if guidance_scale is None else guidance_scale,
        allow_model_mismatch=allow_model_mismatch,
    )


def reconstruct(
    pipeline: Pipeline,
    inversion: Inversion,
    prompt: Optional[str] = None,
    guidance_scale: float = 7.5,
    allow_model_mismatch: bool = False,
) -> Image.Image:
    """Samples the image back from `z_T` with the per-step null embeddings.

    Args:
        pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`): the pipeline the inversion was made with.
        inversion (`Inversion`): the result of `invert` (or `Inversion.load`).
        prompt (`str`, *optional*): defaults to the source prompt (a reconstruction); another
            prompt gives a plain prompt-swap edit.
        guidance_scale (`float`, defaults to 7.5): w; the inversion's own w reconstructs best.
        allow_model_mismatch (`bool`, defaults to False): use an inversion made with other weights
            than the pipeline's (refused otherwise: the result would be garbage).
    """
    latents = reconstruction_latents(pipeline, inversion, prompt, guidance_scale, allow_model_mismatch)
    return to_pil(vae_codec.decode(pipeline.vae, latents)[0])
