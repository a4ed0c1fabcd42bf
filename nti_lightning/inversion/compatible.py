"""Whether an inversion fits the model it is about to be edited or reconstructed with.

Every consumer of an artifact (edits, `nti predict`, the app, `pipeline_kwargs` for a diffusers
pipeline) checks it here first: a shape, prediction type or weights fingerprint that differs
from the inversion's would otherwise edit into garbage without an error.
"""

from __future__ import annotations

import logging
from typing import Optional

from nti_lightning.errors import ModelError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.methods import method_of
from nti_lightning.models.fingerprint import model_reference, pipeline_fingerprint
from nti_lightning.models.pipelines import Pipeline, is_sdxl

log = logging.getLogger(__name__)


def check_compatible(
    pipeline: Pipeline,
    inversion: Inversion,
    name: Optional[str] = None,
    allow_model_mismatch: bool = False,
) -> None:
    """Raises `ValueError` naming the inversion when it was not made with a model like `pipeline`'s.

    Checks the latent shape against the UNet's, the null embeddings' token count and width against
    the tokenizer and text encoder, their number against the recorded T, the method (one this version
    knows, with the offsets it stores or none), the prediction type, and
    the weights' fingerprint (`ModelError`, naming both models): a model of the same shape with
    other weights passes every other check and edits into garbage. An inversion without a
    fingerprint (written by an older version) is accepted with a warning, once per process.

    Args:
        pipeline (`Pipeline`): the pipeline to edit with.
        inversion (`Inversion`): the inversion to check.
        name (`str`, *optional*): how to name the inversion in errors (e.g. its file); defaults to
            its id or source prompt.
        allow_model_mismatch (`bool`, defaults to False): accept an inversion whose fingerprint is
            not the pipeline's (for experts: e.g. the same weights re-saved in another precision
            of a different rounding).
    """
    name = name or str(inversion.metadata.get("id") or f"inversion of {inversion.prompt!r}")
    made_with = f" (made with {inversion.metadata['model']!r})" if "model" in inversion.metadata else ""
    pipeline_xl = is_sdxl(pipeline)
    if inversion.is_sdxl != pipeline_xl:
        kinds = ("an SDXL", "an SD 1.x/2.x") if inversion.is_sdxl else ("an SD 1.x/2.x", "an SDXL")
        raise ModelError(
            f"{name}: {kinds[0]} inversion{made_with} cannot be used with {kinds[1]} model "
            f"({model_reference(pipeline)!r}); use the model it was inverted with"
        )
    config = pipeline.unet.config
    size = config.sample_size
    expected = (config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))
    if tuple(inversion.z_T.shape) != expected:
        raise ValueError(
            f"{name}: latent z_T {tuple(inversion.z_T.shape)} does not match this model's {expected}{made_with}; "
            "edit with the model the image was inverted with"
        )
    if tuple(inversion.source_latent.shape) != expected:
        raise ValueError(f"{name}: source_latent {tuple(inversion.source_latent.shape)} should be {expected}")
    null = inversion.null_embeddings
    tokens, width = pipeline.tokenizer.model_max_length, config.cross_attention_dim
    if null.dim() != 3 or tuple(null.shape[1:]) != (tokens, width):
        raise ValueError(
            f"{name}: null embeddings {tuple(null.shape)} should be [T, {tokens}, {width}] for this model{made_with}; "
            "edit with the model the image was inverted with"
        )
    steps = inversion.metadata.get("num_inference_steps", null.shape[0])
    if null.shape[0] != steps or steps < 1:
        raise ValueError(f"{name}: {null.shape[0]} null embeddings for num_inference_steps={steps}")
    method = method_of(inversion, name)  # refuses a method this version does not know
    # The tensors a method stores beside the nulls: present exactly when it stores them, in shape.
    for tensor, stored, what, shape in (
        (inversion.latent_offsets, method.stores_offsets, "latent offsets", (steps, *expected)),
        (inversion.pivot_latents, method.stores_pivot, "pivot latents", (steps, *expected)),
        (inversion.coupled_latents, method.stores_pair, "coupled latents", (2, *expected)),
    ):
        if (tensor is not None) != stored:
            has = f"carries {what}" if tensor is not None else f"has no {what}"
            raise ValueError(f"{name}: made by method {method.name!r}, but {has}; the file was altered or damaged")
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: {what} {tuple(tensor.shape)} should be [{', '.join(map(str, shape))}]")
    if pipeline_xl:
        pooled, width = inversion.null_pooled_embeddings, pipeline.text_encoder_2.config.projection_dim
        if tuple(pooled.shape) != (steps, width):
            raise ValueError(
                f"{name}: pooled null embeddings {tuple(pooled.shape)} should be [{steps}, {width}] for this "
                f"model{made_with}"
            )
        time_ids = inversion.metadata.get("time_ids")
        if not (isinstance(time_ids, (list, tuple)) and len(time_ids) == 6):
            raise ValueError(f"{name}: an SDXL inversion needs its six time_ids in the metadata, got {time_ids!r}")
    scheduler_config = inversion.metadata.get("scheduler_config")
    recorded = scheduler_config.get("prediction_type") if isinstance(scheduler_config, dict) else None
    current = pipeline.scheduler.config.get("prediction_type")
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(
            f"{name}: inverted with a {recorded!r} model{made_with}, but this model predicts {current!r}"
        )
    recorded_fingerprint = inversion.metadata.get("model_fingerprint")
    if recorded_fingerprint is None:
        global _warned_unfingerprinted
        if not _warned_unfingerprinted:
            _warned_unfingerprinted = True
            log.warning(
                "%s records no model fingerprint (an older nti-lightning wrote it): its model is not checked", name
            )
        return
    fingerprint = pipeline_fingerprint(pipeline)
    if recorded_fingerprint != fingerprint and not allow_model_mismatch:
        raise ModelError(
            f"{name}: made with {inversion.metadata.get('model', 'another model')!r} (weights fingerprint "
            f"{recorded_fingerprint}), but this model {model_reference(pipeline)!r} has other weights (fingerprint "
            f"{fingerprint}); use the model it was inverted with, or set allow_model_mismatch"
        )


#: Whether the missing-fingerprint warning was given (once per process, not once per file).
_warned_unfingerprinted = False
