"""The second and third stages: `DiffusionStage` trains the UNet and the text encoder.

One class serves both: the diffusion stage from scratch (grounding grown around the shape, a
warming-up moving average) and the refinement that goes on from the averaged weights (the shape
words held to the shape itself); `train_demo` chooses the settings.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from nti_lightning.demo.train.components import warmup_cosine
from nti_lightning.demo.train.grounding import (
    RecordingCrossAttnProcessor,
    grounded_token_positions,
)
from nti_lightning.models.tiny import SD_SCHEDULER_CONFIG


class DiffusionStage(pl.LightningModule):
    """Trains a text-conditioned UNet and its text encoder for epsilon prediction on VAE latents.

    Besides the denoising loss, a grounding loss (after TokenCompose, Wang et al. 2023; see
    `grounding_loss`) asks each cross-attention layer to spend the attention of the words
    describing the shape ("red", "circle") on the shape and that of the background words on the
    background, using the generator's shape masks. Plain denoising lets a small model read every
    word at every pixel; Prompt-to-Prompt's word swaps and LocalBlend need maps that say where
    each word acts, as Stable Diffusion's do.

    Args:
        unet (`UNet2DConditionModel`): the denoiser to train (in place).
        text_encoder (`CLIPTextModel`): the text encoder to train (in place).
        vae (`AutoencoderKL`): the trained, frozen VAE; its `scaling_factor` must be set.
        tokenizer (`CLIPTokenizer`): the prompt tokenizer (`clip_tokenizer()`).
        learning_rate (`float`, defaults to 1e-3): peak AdamW rate.
        uncond_probability (`float`, defaults to 0.1): chance of training a sample on "".
        ema_decay (`float`, defaults to 0.999): decay of the moving average of the weights.
        warmup_steps (`int`, defaults to 200): linear warm-up steps.
        total_steps (`int`, defaults to 4000): steps of the stage (cosine decay length).
        grounding_weight (`float`, defaults to 0.01): weight of the grounding loss; 0 turns it off.
        grounding_max_timestep (`int`, defaults to 750): grounding applies to timesteps below this.
        grounding_growth (`int`, defaults to 1): cells by which the shape words' region is grown.
        ema_warmup (`bool`, defaults to True): let the moving average follow the weights closely
            over the first steps (for weights trained from scratch); off, it starts from the
            given weights at the full decay (for a stage that goes on from averaged weights).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        vae: AutoencoderKL,
        tokenizer: CLIPTokenizer,
        learning_rate: float = 1e-3,
        uncond_probability: float = 0.1,
        ema_decay: float = 0.999,
        warmup_steps: int = 200,
        total_steps: int = 4000,
        grounding_weight: float = 0.01,
        grounding_max_timestep: int = 750,
        grounding_growth: int = 1,
        ema_warmup: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
        self.learning_rate = learning_rate
        self.uncond_probability = uncond_probability
        self.ema_decay = ema_decay
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.grounding_weight = grounding_weight
        self.grounding_max_timestep = grounding_max_timestep
        self.grounding_growth = grounding_growth
        self.ema_warmup = ema_warmup
        self.shape_tokens, self.background_tokens = grounded_token_positions(tokenizer)
        self.ema: list[torch.Tensor] = [p.detach().clone() for p in self.trained_parameters()]
        self._token_ids: dict[str, torch.Tensor] = {}
        self.cross_attention_maps: list[torch.Tensor] = []
        self.default_processors = dict(unet.attn_processors)
        if grounding_weight > 0:
            unet.set_attn_processor(
                {
                    name: RecordingCrossAttnProcessor(self.cross_attention_maps)
                    if name.endswith("attn2.processor")
                    else processor
                    for name, processor in unet.attn_processors.items()
                }
            )

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The UNet's and the text encoder's parameters, in a fixed order."""
        return list(self.unet.parameters()) + list(self.text_encoder.parameters())

    def train(self, mode: bool = True) -> "DiffusionStage":
        super().train(mode)
        self.vae.eval()  # frozen: Lightning's train() must not switch it back
        return self

    def token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        """`[B, 77]` ids, padded as Stable Diffusion pads (the few distinct captions are cached)."""
        rows = []
        for caption in captions:
            if caption not in self._token_ids:
                self._token_ids[caption] = self.tokenizer(
                    caption, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
            rows.append(self._token_ids[caption])
        return torch.stack(rows).to(self.device)

    def grounding_loss(self, coverage: torch.Tensor, grounded: torch.Tensor) -> torch.Tensor:
        """The grounding loss of the cross-attention maps recorded in the last UNet call.

        For every grounded word, 1 - the share of its attention map (averaged over heads) that
        falls inside its region, averaged over words, layers and samples. At each layer's
        resolution the background words' region is the part of each cell the shape leaves
        uncovered, and the shape words' region the part it covers (grown by `grounding_growth`
        cells). The shape words must stay off the background: a Prompt-to-Prompt word swap keeps
        the source's attention maps, so whatever attention "red" spends around the shape becomes
        "blue" there in the edit, multiplied by the guidance scale.

        Args:
            coverage (`torch.Tensor`): `[B, 1, H, W]` shape coverage of the images.
            grounded (`torch.Tensor`): `[B]` bool, the samples the loss applies to.
        """
        if not grounded.any() or not self.cross_attention_maps:
            return coverage.new_zeros(())
        tokens = self.shape_tokens + self.background_tokens
        losses = []
        for probs in self.cross_attention_maps:
            maps = probs[grounded].mean(dim=1)[..., tokens]  # [b, queries, tokens]
            side = math.isqrt(maps.shape[1])
            inside = F.interpolate(coverage[grounded], size=(side, side), mode="area")
            shape_region = inside
            if self.grounding_growth > 0:
                grow = self.grounding_growth
                shape_region = F.max_pool2d(inside, 2 * grow + 1, stride=1, padding=grow)
            shape_region = shape_region.flatten(1)[..., None]
            background_region = 1 - inside.flatten(1)[..., None]
            regions = torch.cat(
                [shape_region.expand(-1, -1, len(self.shape_tokens)),
                 background_region.expand(-1, -1, len(self.background_tokens))],
                dim=-1,
            )
            share = (maps * regions).sum(dim=1) / maps.sum(dim=1).clamp_min(1e-8)
            losses.append(1 - share.mean())
        return torch.stack(losses).mean()

    def training_step(self, batch: dict[str, Any], batch_index: int) -> torch.Tensor:
        pixels, captions = batch["pixels"], list(batch["caption"])
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        dropped = torch.rand(len(captions)) < self.uncond_probability
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]
        embeddings = self.text_encoder(self.token_ids(captions))[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        self.cross_attention_maps.clear()
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=embeddings).sample
        denoising = F.mse_loss(prediction, noise)
        grounded = ~dropped.to(self.device) & (timesteps < self.grounding_max_timestep)
        grounding = self.grounding_loss(batch["coverage"], grounded)
        self.cross_attention_maps.clear()
        loss = denoising + self.grounding_weight * grounding
        self.log_dict({"diffusion/loss": denoising, "diffusion/grounding": grounding}, prog_bar=True)
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        # Warm-up of the average: early weights are poor, so they fade out fast.
        step = self.global_step
        decay = min(self.ema_decay, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_decay
        for average, parameter in zip(self.ema, self.trained_parameters()):
            average.lerp_(parameter.detach(), 1 - decay)

    @torch.no_grad()
    def finish(self) -> None:
        """Copies the moving average into the UNet and text encoder and puts back the UNet's
        own attention processors (call after training)."""
        for average, parameter in zip(self.ema, self.trained_parameters()):
            parameter.copy_(average)
        self.unet.set_attn_processor(self.default_processors)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.trained_parameters(), lr=self.learning_rate, weight_decay=0.0)
        scheduler = warmup_cosine(optimizer, self.warmup_steps, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
