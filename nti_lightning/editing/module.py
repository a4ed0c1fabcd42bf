"""`EditModule`: Prompt-to-Prompt editing of inversion files as a LightningModule (`nti predict`).

Each predict step takes one edit spec (`nti_lightning.editing.data`), loads its inversion,
builds its controller and returns the pictures: the input (the VAE decoding of the stored source
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
from nti_lightning.editing.edit import check_compatible, edit_latents
from nti_lightning.editing.pictures import cross_attention_picture
from nti_lightning.editing.specs import EditSpec, EditSpecError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.pipelines import Pipeline


class EditModule(pl.LightningModule):
    """Edits inverted images with Prompt-to-Prompt, one edit spec per predict step.

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
        allow_model_mismatch (`bool`, defaults to False): edit inversions made with other weights
            than this model's (each is refused otherwise, as a failed edit naming both models).
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
        allow_model_mismatch: bool = False,
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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        try:
            if batch["error"] is not None:
                raise EditSpecError(batch["error"])
            spec = EditSpec.from_dict(batch["spec"], batch["id"])
            return {"id": batch["id"], "where": batch["where"], **self.edit_spec(spec)}
        except (ValueError, OSError) as error:  # ArtifactError and EditSpecError are ValueErrors
            return {"id": batch["id"], "where": batch["where"], "spec": batch["spec"], "error": str(error)}

    @torch.no_grad()
    def edit_spec(self, spec: EditSpec) -> dict[str, Any]:
        """The pictures of one spec: `images` `[N, 3, H, W]` in [0, 1] with their `labels`, and `attention`."""
        pipeline = self.pipeline
        inversion = Inversion.load(spec.artifact)
        check_compatible(pipeline, inversion, name=spec.artifact, allow_model_mismatch=self.hparams.allow_model_mismatch)
        prompts = spec.all_prompts(inversion.prompt)
        hparams = self.hparams
        controller = spec.controller(
            prompts,
            pipeline.tokenizer,
            hparams.cross_replace_steps,
            hparams.self_replace_steps,
            hparams.self_replace_max_queries,
            hparams.blend_resolution,
        )
        store = controller.new_store() if controller is not None else AttentionStore()
        edited = edit_latents(
            pipeline,
            inversion,
            prompts,
            controller=controller,
            guidance_scale=hparams.guidance_scale,
            attention_store=store,
            allow_model_mismatch=hparams.allow_model_mismatch,
        )
        # Without control or store the source prompt reproduces `reconstruct` exactly.
        reconstruction = edit_latents(
            pipeline, inversion, [inversion.prompt], guidance_scale=hparams.guidance_scale,
            allow_model_mismatch=hparams.allow_model_mismatch,
        )
        source = inversion.source_latent.unsqueeze(0).to(edited.device)
        images = vae_codec.decode(pipeline.vae, torch.cat([source, reconstruction, edited[1:]])).cpu()
        attention = cross_attention_picture(store, pipeline.tokenizer, prompts[0]) if hparams.attention_maps else None
        labels = list(prompts[1:])
        if spec.kind == "reweight":  # the prompt alone would not say what changed
            factors = ", ".join(f"{word} x{factor:g}" for word, factor in spec.options["words"].items())
            labels = [f"{label} [{factors}]" for label in labels]
        return {
            "prompts": prompts,
            "kind": spec.kind,
            "artifact": spec.artifact,
            "images": images,
            "labels": ["input (VAE)", "reconstruction", *labels],
            "attention": attention,
        }
