"""`EditModule`: editing inversion files as a LightningModule (`nti predict`), with Prompt-to-Prompt or another editor.

Each predict step takes a batch of edit specs (`nti_lightning.editing.data`), loads their
inversions, builds their controllers, samples them together (every spec's rows in each UNet call,
`edit_jobs_latents`) and returns the pictures of each: the input (the VAE decoding of the stored source
latent), the reconstruction (the source prompt without control), the edits, and the source
prompt's cross-attention maps. A spec that cannot be edited (unreadable or mismatched file, bad
prompts or words) comes back as a failure record instead, so the run goes on; `EditWriter`
writes both.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch

from nti_lightning.editing.attention import AttentionStore
from nti_lightning.editing.edit import EditJob, edit_jobs_latents
from nti_lightning.editing.pictures import cross_attention_picture
from nti_lightning.editing.specs import EditSpec, EditSpecError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.pipelines import Pipeline


class EditModule(pl.LightningModule):
    """Edits inverted images with Prompt-to-Prompt, a batch of edit specs per predict step.

    Args:
        pretrained (`str`, defaults to "tiny"): the Stable Diffusion model the images were inverted
            with: a hub id, a diffusers folder, a single-file `.safetensors` checkpoint, or a
            built-in name ("tiny", "tiny-v", "tiny-xl", "shapes"); SD 1.x, 2.x or SDXL.
        guidance_scale (`float`, defaults to 7.5): w, classifier-free guidance scale.
        cross_replace_steps (`float`, defaults to 0.8): fraction of the steps with cross-attention
            replaced, for specs that do not set it.
        self_replace_steps (`float`, defaults to 0.4): fraction of the steps with self-attention
            replaced, for specs that do not set it.
        self_replace_max_queries (`int`, defaults to 1024): self-attention is replaced in layers
            with at most this many query positions (32x32: for SD 1.x at 512 px all but the 64x64
            layers, for SDXL at 1024 px its 32x32 layers), for specs that do not set it.
        blend_resolution (`int`, *optional*): side of the cross-attention maps LocalBlend reads,
            for specs that do not set it; defaults to the coarsest (16 for SD 1.x at 512 px, 32
            for SDXL at 1024 px).
        attention_maps (`bool`, defaults to True): also draw the source prompt's cross-attention maps.
        reconstruction (`bool`, defaults to True): also sample each source prompt without control
            (the grid's "reconstruction" panel); False saves that sampling run, a third of the
            UNet rows of a one-edit spec (`nti bench` needs only the edits).
        allow_model_mismatch (`bool`, defaults to False): edit inversions made with other weights
            than this model's (each is refused otherwise, as a failed edit naming both models).
        channels_last (`bool`, defaults to False): keep the UNet's weights in channels-last memory
            format (changes the pipeline in place). Its convolutions are faster on a CPU: the
            `shapes` model's edits took about a fifth less time, one spec at a time and 24 per
            step alike (BENCHMARKS.md); results differ from the default layout at float rounding.
    """

    def __init__(
        self,
        pretrained: str = "tiny",
        guidance_scale: float = 7.5,
        cross_replace_steps: float = 0.8,
        self_replace_steps: float = 0.4,
        self_replace_max_queries: int = 1024,
        blend_resolution: Optional[int] = None,
        attention_maps: bool = True,
        reconstruction: bool = True,
        allow_model_mismatch: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # Not logged: TensorBoard would get a meaningless `hp_metric` scalar (the run's config is saved
        # beside its logs by LightningCLI anyway).
        self.save_hyperparameters(logger=False)
        self.pipeline: Optional[Pipeline] = None
        self.unet: Any = None
        self.vae: Any = None
        self.text_encoder: Any = None
        self.text_encoder_2: Any = None  # SDXL's second text encoder

    def attach_pipeline(self, pipeline: Pipeline) -> "EditModule":
        """Uses an already loaded SD or SDXL pipeline (its networks become this module's, frozen)."""
        text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder, text_encoder_2):
            if part is not None:
                part.requires_grad_(False).eval()
        self.pipeline = pipeline
        # Registered as submodules so that Lightning moves them to the device.
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.text_encoder_2 = text_encoder_2
        return self

    def configure_model(self) -> None:
        if self.pipeline is None:
            self.attach_pipeline(load_pipeline(self.hparams.pretrained))
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """The pictures (or the failure record) of each spec of `batch`, sampled together."""
        results: list[Optional[dict[str, Any]]] = [None] * len(batch)
        prepared = []
        for k, item in enumerate(batch):
            try:
                if item["error"] is not None:
                    raise EditSpecError(item["error"])
                spec = EditSpec.from_dict(item["spec"], item["id"])
                prepared.append((k, spec, self.prepare(spec)))
            except (ValueError, OSError) as error:  # ArtifactError and EditSpecError are ValueErrors
                results[k] = _failure(item, error)
        # Edits sampled together need one T: one sampling run per T in the batch.
        for steps in sorted({job.inversion.num_inference_steps for _, _, job in prepared}):
            group = [entry for entry in prepared if entry[2].inversion.num_inference_steps == steps]
            try:
                pictures = self.pictures([job for _, _, job in group], [spec for _, spec, _ in group])
            except (ValueError, OSError) as error:
                # One edit broke the batch: each on its own, so that only the faulty one fails.
                pictures = [error] if len(group) == 1 else []
                for _, spec, job in group if len(group) > 1 else []:
                    try:
                        pictures += self.pictures([job], [spec])
                    except (ValueError, OSError) as own_error:
                        pictures.append(own_error)
            for (k, spec, _), picture in zip(group, pictures):
                item = batch[k]
                results[k] = (
                    _failure(item, picture)
                    if isinstance(picture, Exception)
                    else {"id": item["id"], "where": item["where"], **picture}
                )
        return [result for result in results if result is not None]

    def prepare(self, spec: EditSpec) -> EditJob:
        """The edit of one spec: its inversion (checked against the model), prompts and controller."""
        pipeline, hparams = self.pipeline, self.hparams
        inversion = Inversion.load(spec.artifact)
        check_compatible(pipeline, inversion, name=spec.artifact, allow_model_mismatch=hparams.allow_model_mismatch)
        prompts = spec.all_prompts(inversion.prompt)
        controller = spec.controller(
            prompts,
            pipeline.tokenizer,
            hparams.cross_replace_steps,
            hparams.self_replace_steps,
            hparams.self_replace_max_queries,
            hparams.blend_resolution,
        )
        store = controller.new_store() if controller is not None else AttentionStore()
        return EditJob(inversion, prompts, controller, store, spec.editor_settings())

    @torch.no_grad()
    def pictures(self, jobs: list[EditJob], specs: list[EditSpec]) -> list[dict[str, Any]]:
        """The pictures of edits of one T, sampled together: per spec `images` `[N, 3, H, W]` in
        [0, 1] (input, reconstruction unless turned off, edits) with their `labels`, the index of
        the first edit (`first_edit`), and `attention`."""
        pipeline, hparams = self.pipeline, self.hparams
        mismatch = hparams.allow_model_mismatch
        edited = edit_jobs_latents(pipeline, jobs, hparams.guidance_scale, allow_model_mismatch=mismatch)
        sources = [job.inversion.source_latent.unsqueeze(0).to(latents.device) for job, latents in zip(jobs, edited)]
        if hparams.reconstruction:
            # The source prompts without control or store: `reconstruct`, the batch's rounding aside.
            plain = [EditJob(job.inversion, [job.inversion.prompt]) for job in jobs]
            reconstructions = edit_jobs_latents(pipeline, plain, hparams.guidance_scale, allow_model_mismatch=mismatch)
            sources = [torch.cat([source, reconstruction]) for source, reconstruction in zip(sources, reconstructions)]
        stacks = [torch.cat([source, latents[1:]]) for source, latents in zip(sources, edited)]
        decoded = vae_codec.decode(pipeline.vae, torch.cat(stacks)).cpu().split([len(stack) for stack in stacks])
        head = ["input (VAE)", "reconstruction"] if hparams.reconstruction else ["input (VAE)"]
        results = []
        for job, spec, images in zip(jobs, specs, decoded):
            prompts = job.prompts
            store = job.attention_store
            attention = (
                cross_attention_picture(store, pipeline.tokenizer, prompts[0])
                if hparams.attention_maps and store is not None and store.sums  # Plug-and-Play's source has none
                else None
            )
            labels = list(prompts[1:])
            if spec.kind == "reweight":  # the prompt alone would not say what changed
                factors = ", ".join(f"{word} x{factor:g}" for word, factor in spec.options["words"].items())
                labels = [f"{label} [{factors}]" for label in labels]
            results.append({
                "prompts": prompts,
                "kind": spec.kind,
                "artifact": spec.artifact,
                "images": images,
                "labels": [*head, *labels],
                "first_edit": len(head),
                "attention": attention,
            })
        return results


def _failure(item: dict[str, Any], error: BaseException) -> dict[str, Any]:
    """The failure record of an item that could not be edited."""
    return {"id": item["id"], "where": item["where"], "spec": item["spec"], "error": str(error)}
