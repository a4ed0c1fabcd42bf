"""`pipeline_kwargs`: an inversion as the keyword arguments of diffusers' own pipelines.

`StableDiffusionPipeline` and `StableDiffusionXLPipeline` sample an inversion as `reconstruct`
does when they start from its `z_T` (`latents`) and take its null embedding of step i as the
unconditional input of step i. They take one `negative_prompt_embeds` for the whole run and, with
classifier-free guidance, concatenate it once before the loop as the first half of
`prompt_embeds` (SDXL: of `add_text_embeds` too, with the pooled one). The step callback
(`callback_on_step_end`) may hand back new tensors for the next step, so after step i it puts
step i+1's null into those first halves. The user's own callback runs after it, on the same
tensors, and what it returns is applied on top, so the pipeline's other arguments and step
callbacks combine with an inversion as they would with a prompt.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import DDIMScheduler

from nti_lightning.diffusion.ddim import ddim_scheduler
from nti_lightning.errors import ModelError, OptionError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.inversion.methods import method_of, source_branch_hook
from nti_lightning.models.pipelines import Pipeline

#: A diffusers step callback: `(pipeline, step, timestep, callback_kwargs) -> dict`.
StepEndCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], Optional[dict[str, Any]]]


def pipeline_kwargs(
    pipeline: Pipeline,
    inversion: Inversion,
    prompt: Optional[Union[str, Sequence[str]]] = None,
    *,
    guidance_scale: Optional[float] = None,
    callback_on_step_end: Optional[StepEndCallback] = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    allow_model_mismatch: bool = False,
) -> dict[str, Any]:
    """The keyword arguments with which `pipeline(**kwargs)` samples `inversion`.

    With the inversion's prompt this is its reconstruction, pixel for pixel `reconstruct`'s in
    fp32; with another prompt, the prompt-swap edit of `reconstruct(..., prompt=...)`. Add any
    other argument of the pipeline (`output_type`, `guidance_rescale`, `cross_attention_kwargs`,
    `denoising_end`, ...) to the dictionary or next to it: `pipeline(**kwargs, output_type="np")`.

    The pipeline is not changed. Its scheduler must already be the inversion's DDIM schedule:
    a `DDIMScheduler` with `clip_sample=False` and `set_alpha_to_one=False` on the noise schedule
    the inversion was made with, as `load_pipeline` gives. Any other scheduler is refused, and the
    error says how to set the right one.

    Args:
        pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`): the pipeline the
            inversion was made with (or one with the same weights and scheduler).
        inversion (`Inversion`): the result of `invert` (or `Inversion.load`).
        prompt (`str` or sequence of `str`, *optional*): defaults to the inversion's source prompt
            (a reconstruction); other prompts give plain prompt-swap edits, one image each, all
            from the same `z_T` and nulls.
        guidance_scale (`float`, *optional*): w, above 1; defaults to the inversion's own w (the
            one that reconstructs the image).
        callback_on_step_end (`Callable` or diffusers `PipelineCallback`, *optional*): your own
            step callback, called after every step as diffusers calls it, `(pipeline, step,
            timestep, callback_kwargs)`, once the next step's null is in `callback_kwargs`; the
            tensors of the dictionary it returns replace the pipeline's, as in diffusers.
        callback_on_step_end_tensor_inputs (sequence of `str`, defaults to `("latents",)`): the
            tensors your callback reads (any of the pipeline's `_callback_tensor_inputs`); those of
            a `PipelineCallback` object are taken from it. `prompt_embeds` (and SDXL's
            `add_text_embeds`) are always there: the nulls travel in them.
        allow_model_mismatch (`bool`, defaults to False): use an inversion made with other
            weights than the pipeline's (refused otherwise: the result would be garbage).

    Returns:
        `dict`: `prompt`, `latents` (`z_T`, one row per prompt, in the UNet's dtype),
        `negative_prompt_embeds` (step 0's null; SDXL also `negative_pooled_prompt_embeds`),
        `num_inference_steps`, `guidance_scale`, `eta` (0), `callback_on_step_end`,
        `callback_on_step_end_tensor_inputs` and, for SDXL, `original_size`,
        `crops_coords_top_left` and `target_size` from the inversion's time ids.

    Raises:
        `ModelError` (a `ValueError`): the inversion was made with another model (kind, shapes,
            prediction type or weights' fingerprint, as `reconstruct` checks), or the pipeline's
            scheduler is not the inversion's DDIM schedule.
        `OptionError` (a `ValueError`): `guidance_scale` of 1 or less (the nulls are the
            unconditional half of classifier-free guidance), or no prompt.

    Example:

    ```py
    >>> import nti_lightning as nti
    >>> pipe = nti.load_pipeline("tiny")
    >>> [inversion] = nti.invert(pipe, "cat.png", "a cat", num_inference_steps=50)
    >>> image = pipe(**nti.pipeline_kwargs(pipe, inversion)).images[0]  # the pixels of nti.reconstruct(pipe, inversion)
    >>> tiger = pipe(**nti.pipeline_kwargs(pipe, inversion, prompt="a tiger")).images[0]
    ```

    In fp16 or bf16 the images are close to `reconstruct`'s but not the same: diffusers keeps the
    latents in the UNet's dtype between steps, `reconstruct` keeps them in fp32. For a
    v-prediction model `DDIMScheduler` finds x̂0 as `sqrt(ā) x - sqrt(1-ā) v` and `reconstruct`
    from ε, the same value rounded otherwise: a pixel may move by one level. An SDXL pipeline
    with an invisible watermark marks its images. The latents have one row per prompt, so
    `num_images_per_prompt` must stay 1.
    """
    prompts = [inversion.prompt] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise OptionError("pipeline_kwargs needs at least one prompt")
    guidance_scale = inversion.guidance_scale if guidance_scale is None else float(guidance_scale)
    if guidance_scale <= 1:
        raise OptionError(
            f"guidance_scale={guidance_scale}: the inversion's null embeddings are the unconditional input of "
            "classifier-free guidance, which diffusers runs only for a guidance_scale above 1"
        )
    check_compatible(pipeline, inversion, allow_model_mismatch=allow_model_mismatch)
    method = method_of(inversion)
    if not method.sampling_rule(inversion, prompts, guidance_scale).is_plain:
        raise OptionError(
            f"pipeline_kwargs: the {method.label} inversion (method {method.name!r}) is sampled with steps of its own "
            "that a stock diffusers pipeline cannot take; use nti.reconstruct or nti.edit"
        )
    timesteps = _check_scheduler(pipeline, inversion)

    device = getattr(pipeline, "_execution_device", None) or pipeline.device
    dtype = pipeline.unet.dtype
    rows = len(prompts)
    nulls = inversion.null_embeddings.to(device)
    pooled = inversion.null_pooled_embeddings.to(device) if inversion.is_sdxl else None
    user_inputs = list(getattr(callback_on_step_end, "tensor_inputs", None) or callback_on_step_end_tensor_inputs)
    swapped = ["prompt_embeds", "add_text_embeds"] if pooled is not None else ["prompt_embeds"]
    # Direct Inversion: the source prompt's rows get the step's offset after the step (and after
    # the user's callback, as LocalBlend comes first in `edit`), retracing the pivot.
    retrace = source_branch_hook(inversion, prompts, None)
    needed = swapped + (["latents"] if retrace is not None else [])

    def swap_nulls(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step >= len(timesteps) or int(timestep) != timesteps[step]:
            raise ModelError(
                f"the pipeline ran step {step} at timestep {int(timestep)}, but the inversion's timesteps are "
                f"{timesteps}: call it with the inversion's num_inference_steps={len(timesteps)} and its DDIM scheduler"
            )
        outputs: dict[str, Any] = {}
        if step + 1 < len(timesteps) and pipe.do_classifier_free_guidance:
            # [negatives, positives]: the first half takes the next step's null.
            for name, null in zip(swapped, (nulls, pooled)):
                tensor = callback_kwargs[name]
                half = tensor.shape[0] // 2
                row = null[step + 1 : step + 2].to(tensor.device, tensor.dtype)
                outputs[name] = torch.cat([row.expand(half, *row.shape[1:]), tensor[half:]])
            if "negative_prompt_embeds" in callback_kwargs:  # read by the user's callback only
                outputs["negative_prompt_embeds"] = outputs["prompt_embeds"][: outputs["prompt_embeds"].shape[0] // 2]
        if callback_on_step_end is not None:
            user_outputs = callback_on_step_end(pipe, step, timestep, {**callback_kwargs, **outputs})
            outputs.update(user_outputs or {})
        if retrace is not None:
            outputs["latents"] = retrace(step, int(timestep), outputs.get("latents", callback_kwargs["latents"]))
        return outputs

    kwargs: dict[str, Any] = {
        "prompt": prompts[0] if prompt is None or isinstance(prompt, str) else prompts,
        "latents": inversion.z_T.to(device=device, dtype=dtype).unsqueeze(0).expand(rows, -1, -1, -1).clone(),
        "negative_prompt_embeds": nulls[:1].to(dtype).expand(rows, -1, -1).clone(),
        "num_inference_steps": len(timesteps),
        "guidance_scale": guidance_scale,
        "eta": 0.0,
        "callback_on_step_end": swap_nulls,
        "callback_on_step_end_tensor_inputs": list(dict.fromkeys(needed + user_inputs)),
    }
    if pooled is not None:
        time_ids = [int(v) if float(v).is_integer() else float(v) for v in inversion.metadata["time_ids"]]
        kwargs["negative_pooled_prompt_embeds"] = pooled[:1].to(dtype).expand(rows, -1).clone()
        kwargs["original_size"] = tuple(time_ids[0:2])
        kwargs["crops_coords_top_left"] = tuple(time_ids[2:4])
        kwargs["target_size"] = tuple(time_ids[4:6])
    return kwargs


def _check_scheduler(pipeline: Pipeline, inversion: Inversion) -> list[int]:
    """The inversion's timesteps, or `ModelError` when `pipeline.scheduler` would sample others.

    The pipeline's scheduler must be a `DDIMScheduler` without sample clipping or thresholding
    whose noise levels (`alphas_cumprod`, the level past timestep 0) and timesteps for the
    inversion's T are those of the inversion's recorded scheduler config, read as `invert` reads
    it (`clip_sample` and `set_alpha_to_one` off).
    """
    steps = inversion.num_inference_steps
    recorded = inversion.metadata.get("scheduler_config")
    expected = ddim_scheduler(recorded if isinstance(recorded, dict) else pipeline.scheduler.config)
    expected.set_timesteps(steps)
    fix = (
        "set it with pipe.scheduler = DDIMScheduler.from_config(inversion.metadata['scheduler_config'], "
        "clip_sample=False, set_alpha_to_one=False)"
    )
    scheduler = pipeline.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise ModelError(
            f"the pipeline's scheduler is {type(scheduler).__name__}, but the inversion was made with DDIM; {fix}"
        )
    config = scheduler.config
    for setting in ("clip_sample", "thresholding"):
        if config.get(setting, False):
            raise ModelError(
                f"the pipeline's DDIM scheduler has {setting}=True, which the inversion did not use; {fix}"
            )
    current = DDIMScheduler.from_config(config)
    current.set_timesteps(steps)
    if not torch.equal(current.alphas_cumprod, expected.alphas_cumprod):
        raise ModelError(f"the pipeline's DDIM scheduler has another noise schedule than the inversion's; {fix}")
    if float(current.final_alpha_cumprod) != float(expected.final_alpha_cumprod):
        raise ModelError(
            "the pipeline's DDIM scheduler has set_alpha_to_one=True, but the inversion's last step goes to "
            f"alphas_cumprod[0]; {fix}"
        )
    if not torch.equal(current.timesteps, expected.timesteps):
        raise ModelError(
            f"the pipeline's DDIM scheduler takes timesteps {current.timesteps.tolist()} for "
            f"{steps} steps, but the inversion's are {expected.timesteps.tolist()}; {fix}"
        )
    return [int(t) for t in expected.timesteps]
