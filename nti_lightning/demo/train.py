"""Training the `shapes` model: a small Stable-Diffusion-shaped text-to-image model, on a CPU.

Two Lightning stages, as Stable Diffusion itself was trained:

1. `VAEStage`: an `AutoencoderKL` (32 px images <-> 4x8x8 latents) learns to reconstruct the
   procedural shapes of `nti_lightning.demo.shapes` (pixel MSE + L1, a small KL term). Its latent
   scaling factor is then set to 1 / std of the training latents, as SD's 0.18215 was chosen.
2. `DiffusionStage`: a `UNet2DConditionModel` with cross-attention and a `CLIPTextModel` (fed by
   CLIP's real BPE tokenizer) learn epsilon prediction on the frozen VAE's latents under SD's
   noise schedule; the caption is replaced by "" for 10% of the samples so that classifier-free
   guidance works, and an exponential moving average of the weights is what gets saved.

The result is a diffusers pipeline folder with fp16 safetensors weights (the tokenizer is not
saved: `clip_tokenizer()` rebuilds it offline). Everything is seeded: the same seed, settings and
machine give the same weights, unless the time cap (`max_minutes`) cuts a stage short.

    nti train-demo --output nti_lightning/assets/shapes --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch.utils.data import DataLoader
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from nti_lightning.data.images import to_tensor
from nti_lightning.demo.shapes import (
    BACKGROUND_COLORS,
    BACKGROUND_WORDS,
    SHAPE_WORDS,
    SHAPES,
    ShapesDataset,
    caption_for,
    heldout_samples,
    make_sample,
)
from nti_lightning.inversion.report import image_metrics
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.tiny import SD_SCHEDULER_CONFIG, assemble_pipeline
from nti_lightning.models.tokenizer import VOCAB_SIZE, clip_tokenizer

# Lightning warns that a DataLoader without workers may be slow; here the data costs ~0.1 ms a
# sample and worker processes would take the cores the training needs.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


@dataclass
class DemoConfig:
    """Architecture and training settings of the `shapes` model.

    Args:
        resolution (`int`, defaults to 32): image side in pixels.
        vae_channels (`tuple[int, ...]`, defaults to (32, 64, 64)): VAE block widths; n blocks
            downsample by 2^(n-1) (4x: 8x8 latents at 32 px).
        latent_channels (`int`, defaults to 4): latent channels, as SD.
        vae_attention (`bool`, defaults to False): self-attention in the VAE's middle blocks, as SD.
            Off here: the decoder's attention spreads a change in one region of the latent over
            the whole picture, which undoes Prompt-to-Prompt's LocalBlend (see `VAEStage`).
        unet_channels (`tuple[int, ...]`, defaults to (64, 64)): UNet block widths (8x8 and 4x4
            latents).
        unet_layers_per_block (`int`, defaults to 1): ResNet (and transformer) layers per UNet block.
        attention_heads (`int`, defaults to 8): attention heads of the UNet's transformers.
        text_width (`int`, defaults to 32): text-encoder width, the UNet's cross-attention dim.
        text_layers (`int`, defaults to 0): text-encoder transformer layers. With none, each
            token's embedding is its word at its position (token and position embeddings, final
            layer norm): swapping one word of a prompt changes one key/value of the
            cross-attention and nothing else, which is what Prompt-to-Prompt edits rest on. (SD's
            causal CLIP spreads a word into every later token; a model this small, trained this
            briefly, then lets every pixel read every word.)
        text_heads (`int`, defaults to 4): text-encoder attention heads.
        norm_groups (`int`, defaults to 16): GroupNorm groups of the VAE and the UNet (divides
            every block width).
        vae_steps (`int`, defaults to 3200): optimisation steps of the VAE stage.
        vae_batch_size (`int`, defaults to 32): images per VAE step.
        vae_learning_rate (`float`, defaults to 1e-3): peak AdamW rate of the VAE stage.
        kl_weight (`float`, defaults to 1e-6): weight of the KL term (per latent element, against
            per-pixel reconstruction losses).
        locality_weight (`float`, defaults to 1.0): weight of the VAE's background-locality loss
            (see `VAEStage`).
        locality_start (`float`, defaults to 0.25): fraction of the VAE steps after which the
            locality loss is on (before, the VAE learns to reconstruct undisturbed).
        diffusion_steps (`int`, defaults to 4000): optimisation steps of the diffusion stage.
        diffusion_batch_size (`int`, defaults to 64): images per diffusion step.
        diffusion_learning_rate (`float`, defaults to 1e-3): peak AdamW rate of the diffusion stage.
        uncond_probability (`float`, defaults to 0.1): chance that a caption is replaced by "".
        grounding_weight (`float`, defaults to 0.01): weight of the attention grounding loss (see
            `DiffusionStage`); 0 turns it off.
        grounding_max_timestep (`int`, defaults to 750): the grounding loss is applied to samples
            noised to timesteps below this (above it the layout cannot be read off the latent yet).
        grounding_growth (`int`, defaults to 1): cells by which the shape words' region is grown at
            each cross-attention layer's resolution, so that while the model learns to draw, the
            cells along the outline, which decide where the shape ends, may read the shape words.
        refine_steps (`int`, defaults to 1500): steps of the grounding refinement that follows the
            diffusion stage (0 for none): the same training from the averaged weights, with the
            shape words held to the shape itself. The growth above lets them leak into the
            background around the shape, and a Prompt-to-Prompt word swap keeps the source's maps,
            so that leak becomes a halo of the new colour, multiplied by the guidance scale.
            Trained without growth from the start, the model draws the shapes of edits too small.
        refine_learning_rate (`float`, defaults to 3e-4): peak AdamW rate of the refinement
            (warm-up of half `warmup_steps`, then cosine).
        refine_grounding_weight (`float`, defaults to 0.05): grounding weight of the refinement.
        refine_grounding_growth (`int`, defaults to 0): grounding growth of the refinement.
        ema_decay (`float`, defaults to 0.999): decay of the weights' moving average.
        warmup_steps (`int`, defaults to 200): linear warm-up of both stages' rates (then cosine).
        gradient_clip (`float`, defaults to 1.0): gradient-norm clipping of both stages.
    """

    resolution: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    vae_attention: bool = False
    unet_channels: tuple[int, ...] = (64, 64)
    unet_layers_per_block: int = 1
    attention_heads: int = 8
    text_width: int = 32
    text_layers: int = 0
    text_heads: int = 4
    norm_groups: int = 16
    vae_steps: int = 3200
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    locality_weight: float = 1.0
    locality_start: float = 0.25
    diffusion_steps: int = 4000
    diffusion_batch_size: int = 64
    diffusion_learning_rate: float = 1e-3
    uncond_probability: float = 0.1
    grounding_weight: float = 0.01
    grounding_max_timestep: int = 750
    grounding_growth: int = 1
    refine_steps: int = 1500
    refine_learning_rate: float = 3e-4
    refine_grounding_weight: float = 0.05
    refine_grounding_growth: int = 0
    ema_decay: float = 0.999
    warmup_steps: int = 200
    gradient_clip: float = 1.0

    @property
    def latent_size(self) -> int:
        """Latent side: the resolution over the VAE's downsampling."""
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


# ----------------------------------------------------------------------------------- components
def build_vae(config: DemoConfig) -> AutoencoderKL:
    """A randomly initialised `AutoencoderKL` of `config`'s shape (seed torch first).

    Args:
        config (`DemoConfig`): the architecture.
    """
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.resolution,
        mid_block_add_attention=config.vae_attention,
    )


def build_unet(config: DemoConfig) -> UNet2DConditionModel:
    """A randomly initialised `UNet2DConditionModel` of `config`'s shape (seed torch first).

    Cross-attention runs in the first down block, the middle block and the last up block: at the
    latent's full resolution (where Prompt-to-Prompt's LocalBlend reads its masks) and at the
    coarsest one.

    Args:
        config (`DemoConfig`): the architecture.
    """
    blocks = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (blocks - 1),
        up_block_types=("UpBlock2D",) * (blocks - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,  # diffusers reads it as the number of heads here
        norm_num_groups=config.norm_groups,
    )


def build_text_encoder(config: DemoConfig) -> CLIPTextModel:
    """A randomly initialised `CLIPTextModel` over CLIP's full 49,408-token vocabulary.

    Args:
        config (`DemoConfig`): the architecture.
    """
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's rate over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer.
        warmup_steps (`int`): warm-up length.
        total_steps (`int`): steps of the whole stage.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------- the stages
class VAEStage(pl.LightningModule):
    """Trains an `AutoencoderKL` to reconstruct images: MSE + L1 on pixels, plus `kl_weight`·KL.

    The decoder is trained on posterior samples (not the mean), so that it also decodes the
    slightly-off latents a diffusion sampler produces.

    With `locality_weight`, from `locality_start` of the steps on, half of each batch also trains the decoder to decode the background
    from the background's latents alone: the latents of the shape's region (at the latent
    resolution, grown by one cell as LocalBlend grows its masks) are replaced by those of the
    same picture with the shape in another colour, pushed past it by a random factor in [1, 2]
    (guided sampling overshoots colours like this), and the loss counts the pixels outside that
    region, whose target is the original background. The decoder's GroupNorm statistics and
    attention are global, so without this an edited region can shift the colour of the whole
    decoded background even where the latents are untouched.

    Args:
        vae (`AutoencoderKL`): the autoencoder to train (in place).
        learning_rate (`float`, defaults to 1e-3): peak AdamW rate.
        kl_weight (`float`, defaults to 1e-6): KL weight (per latent element).
        warmup_steps (`int`, defaults to 200): linear warm-up steps.
        total_steps (`int`, defaults to 3200): steps of the stage (cosine decay length).
        locality_weight (`float`, defaults to 1.0): weight of the background-locality loss; 0
            turns it off.
        locality_start (`float`, defaults to 0.25): fraction of `total_steps` after which it is on.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        learning_rate: float = 1e-3,
        kl_weight: float = 1e-6,
        warmup_steps: int = 200,
        total_steps: int = 3200,
        locality_weight: float = 1.0,
        locality_start: float = 0.25,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.learning_rate = learning_rate
        self.kl_weight = kl_weight
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.locality_weight = locality_weight
        self.locality_start = locality_start

    def training_step(self, batch: dict[str, Any], batch_index: int) -> torch.Tensor:
        pixels = batch["pixels"]
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample()
        reconstruction = self.vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, pixels)
        l1 = F.l1_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + l1 + self.kl_weight * kl
        logs = {"vae/mse": mse, "vae/kl": kl}
        if self.locality_weight > 0 and self.global_step >= self.locality_start * self.total_steps:
            locality = self.locality_loss(latents.detach(), batch)
            loss = loss + self.locality_weight * locality
            logs["vae/locality"] = locality
        # PSNR of [-1, 1] pixels: a data range of 2.
        logs["vae/psnr"] = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))
        self.log_dict({"vae/loss": loss, **logs}, prog_bar=True)
        return loss

    def locality_loss(self, latents: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """MSE + L1 outside the shape's region of the decoded region-swapped latents (see above).

        Args:
            latents (`torch.Tensor`): `[B, C, h, w]` posterior samples of the batch's pixels.
            batch (`dict`): the batch (`pixels`, `coverage`, `recoloured`).
        """
        half = max(1, latents.shape[0] // 2)
        pixels, latents = batch["pixels"][:half], latents[:half]
        with torch.no_grad():
            other = self.vae.encode(batch["recoloured"][:half]).latent_dist.sample()
        region = F.interpolate(batch["coverage"][:half], size=latents.shape[-2:], mode="area") > 0
        region = F.max_pool2d(region.float(), 3, stride=1, padding=1)
        overshoot = 1 + torch.rand(half, 1, 1, 1, device=latents.device)
        decoded = self.vae.decode(latents + region * overshoot * (other - latents)).sample
        outside = 1 - F.interpolate(region, size=pixels.shape[-2:], mode="nearest")
        error = (decoded - pixels) * outside
        count = outside.sum().clamp_min(1) * pixels.shape[1]
        return (error.square().sum() + error.abs().sum()) / count

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.learning_rate, weight_decay=0.0)
        scheduler = warmup_cosine(optimizer, self.warmup_steps, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RecordingCrossAttnProcessor:
    """diffusers' plain attention (explicit probabilities) that keeps each cross-attention map.

    The maps are appended to `maps` as `[B, heads, queries, 77]` tensors with their autograd
    graph, for the grounding loss. Installed on the cross-attention layers during training only;
    the saved model uses diffusers' default processors.

    Args:
        maps (`list[torch.Tensor]`): where the maps go (the training step empties it).
    """

    def __init__(self, maps: list[torch.Tensor]) -> None:
        self.maps = maps

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # The UNet's transformer blocks call their attention on [B, tokens, C] sequences with no
        # mask, spatial or group norm; these are the steps of diffusers' AttnProcessor that remain.
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.maps.append(probs.view(batch, attn.heads, *probs.shape[1:]))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


def grounded_token_positions(tokenizer: CLIPTokenizer) -> tuple[list[int], list[int]]:
    """Token positions of the caption words describing the shape and the background.

    Checks that every word a caption can hold is a single CLIP token, so that word i of any
    caption is token i + 1 (after the start token).

    Args:
        tokenizer (`CLIPTokenizer`): the prompt tokenizer.
    """
    words = set(" ".join(caption_for(c, s, "x") for c in BACKGROUND_COLORS for s in SHAPES).split()) | set(
        BACKGROUND_COLORS
    )
    words.discard("x")
    split = [word for word in sorted(words) if len(tokenizer(word).input_ids) != 3]
    if split:
        raise ValueError(f"caption words {split} are not single tokens; the grounding positions would be wrong")
    return [i + 1 for i in SHAPE_WORDS], [i + 1 for i in BACKGROUND_WORDS]


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
                    name: RecordingCrossAttnProcessor(self.cross_attention_maps) if name.endswith("attn2.processor") else processor
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
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
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


class ProgressPrinter(pl.Callback):
    """Prints one line every `every` steps (a progress bar floods the log of a background run).

    Args:
        name (`str`): the stage's name.
        every (`int`, defaults to 100): steps between lines.
    """

    def __init__(self, name: str, every: int = 100) -> None:
        self.name = name
        self.every = every
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_index: int) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
            shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
            print(f"[{self.name}] step {step}/{trainer.max_steps} {shown} ({time.monotonic() - self.start:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------- the run
def _trainer(name: str, steps: int, max_seconds: float, config: DemoConfig, log_dir: Optional[str], quiet: bool) -> pl.Trainer:
    if log_dir:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger: Any = TensorBoardLogger(save_dir=log_dir, name=name)
    else:
        logger = False
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,  # one pass over a dataset sized to the steps
        max_time={"seconds": max(1.0, max_seconds)},
        gradient_clip_val=config.gradient_clip,
        logger=logger,
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[] if quiet else [ProgressPrinter(name)],
    )


def _loader(steps: int, batch_size: int, config: DemoConfig, seed: int, recoloured: bool, start: int = 0) -> DataLoader:
    # In index order: the samples are already random, and an ordered stream is reproducible.
    dataset = ShapesDataset(steps * batch_size, "train", seed, config.resolution, recoloured, start)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, drop_last=True)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, config: DemoConfig, seed: int, count: int = 512) -> float:
    """1 / std of the VAE's (sampled) latents over `count` training images: unit-variance latents.

    Args:
        vae (`AutoencoderKL`): the trained VAE.
        config (`DemoConfig`): the settings (resolution).
        seed (`int`): the training stream.
        count (`int`, defaults to 512): images measured.
    """
    pixels = torch.stack([to_tensor(make_sample(i, "train", seed, config.resolution).image) for i in range(count)])
    latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(128)])
    return float(1.0 / latents.std())


@torch.no_grad()
def heldout_vae_psnr(vae: AutoencoderKL, config: DemoConfig, count: int = 64) -> float:
    """Mean PSNR (dB, [0, 1] images) of the VAE round trip (posterior mean) of held-out images.

    Args:
        vae (`AutoencoderKL`): the VAE, with its `scaling_factor` set.
        config (`DemoConfig`): the settings (resolution).
        count (`int`, defaults to 64): held-out images measured.
    """
    pixels = torch.stack([to_tensor(sample.image) for sample in heldout_samples(count, resolution=config.resolution)])
    decoded = vae_codec.decode(vae, vae_codec.encode(vae, pixels))
    psnr, _ = image_metrics(decoded, pixels / 2 + 0.5)
    return float(psnr.mean())


def save_fp16(pipeline: StableDiffusionPipeline, output: str | Path) -> None:
    """Writes `pipeline` as a diffusers folder with fp16 safetensors weights, without the tokenizer.

    The tokenizer files (2 MB) are left out: `clip_tokenizer()` rebuilds the same tokenizer from
    the merge list the package already ships.

    Args:
        pipeline (`StableDiffusionPipeline`): the pipeline (not modified: a half copy is saved).
        output (`str` or `Path`): the folder (created; existing files of the same names replaced).
    """
    output = Path(output)
    parts = {name: getattr(pipeline, name) for name in ("vae", "unet", "text_encoder")}
    states = {name: {k: v.clone() for k, v in part.state_dict().items()} for name, part in parts.items()}
    try:
        for part in parts.values():
            part.to(torch.float16)
        pipeline.save_pretrained(output, safe_serialization=True)
    finally:
        for name, part in parts.items():
            part.to(torch.float32).load_state_dict(states[name])
    shutil.rmtree(output / "tokenizer", ignore_errors=True)


def train_demo(
    output: str | Path,
    seed: int = 0,
    max_minutes: float = 60.0,
    config: Optional[DemoConfig] = None,
    log_dir: Optional[str] = "runs/train-demo",
    quiet: bool = False,
) -> dict[str, Any]:
    """Trains the `shapes` model from scratch and saves it to `output`.

    Args:
        output (`str` or `Path`): the diffusers folder to write.
        seed (`int`, defaults to 0): seeds the weights, the data stream and the noise.
        max_minutes (`float`, defaults to 60.0): wall-clock cap for all stages together; each gets
            its share of it by steps. A stage that hits its cap stops early (the run is then no
            longer reproducible, and a warning says so).
        config (`DemoConfig`, *optional*): architecture and settings; defaults to `DemoConfig()`.
        log_dir (`str`, *optional*, defaults to "runs/train-demo"): TensorBoard logs; `None` for none.
        quiet (`bool`, defaults to False): no progress lines.

    Returns:
        The training summary also written to `output/training.json` (settings, seconds per stage,
        held-out VAE PSNR, latent scaling factor).
    """
    config = config or DemoConfig()
    started = time.monotonic()
    budget = max_minutes * 60.0
    # A VAE step costs about one diffusion step (a little more with the locality loss): its share
    # of the budget by that estimate.
    denoiser_steps = config.diffusion_steps + config.refine_steps  # the UNet's two stages
    vae_share = 1.1 * config.vae_steps / max(1, 1.1 * config.vae_steps + denoiser_steps)

    pl.seed_everything(seed, workers=True, verbose=False)
    vae = build_vae(config)
    unet = build_unet(config)
    text_encoder = build_text_encoder(config)

    vae_stage = VAEStage(
        vae, config.vae_learning_rate, config.kl_weight, config.warmup_steps, config.vae_steps,
        config.locality_weight, config.locality_start,
    )
    trainer = _trainer("vae", config.vae_steps, budget * vae_share, config, log_dir, quiet)
    trainer.fit(vae_stage, train_dataloaders=_loader(config.vae_steps, config.vae_batch_size, config, seed, recoloured=config.locality_weight > 0))
    vae_steps_done = trainer.global_step
    vae_seconds = time.monotonic() - started
    vae = vae.eval().requires_grad_(False)
    scaling_factor = latent_scaling_factor(vae, config, seed)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae_psnr = heldout_vae_psnr(vae, config)
    if not quiet:
        print(f"[vae] held-out PSNR {vae_psnr:.2f} dB, latent scaling factor {scaling_factor:.4f}", flush=True)

    tokenizer = clip_tokenizer()
    diffusion_stage = DiffusionStage(
        unet, text_encoder, vae, tokenizer, config.diffusion_learning_rate, config.uncond_probability,
        config.ema_decay, config.warmup_steps, config.diffusion_steps, config.grounding_weight,
        config.grounding_max_timestep, config.grounding_growth,
    )
    remaining = budget - (time.monotonic() - started)
    share = config.diffusion_steps / max(1, denoiser_steps)
    trainer = _trainer("diffusion", config.diffusion_steps, remaining * share, config, log_dir, quiet)
    trainer.fit(diffusion_stage, train_dataloaders=_loader(config.diffusion_steps, config.diffusion_batch_size, config, seed, recoloured=False))
    diffusion_steps_done = trainer.global_step
    diffusion_stage.finish()
    diffusion_seconds = time.monotonic() - started - vae_seconds

    refine_steps_done = 0
    if config.refine_steps > 0:
        # Same losses from the averaged weights, the shape words held to the shape itself, on the
        # images after those the diffusion stage saw.
        refine_stage = DiffusionStage(
            unet, text_encoder, vae, tokenizer, config.refine_learning_rate, config.uncond_probability,
            config.ema_decay, config.warmup_steps // 2, config.refine_steps, config.refine_grounding_weight,
            config.grounding_max_timestep, config.refine_grounding_growth, ema_warmup=False,
        )
        remaining = budget - (time.monotonic() - started)
        trainer = _trainer("refine", config.refine_steps, remaining, config, log_dir, quiet)
        already_seen = config.diffusion_steps * config.diffusion_batch_size
        loader = _loader(config.refine_steps, config.diffusion_batch_size, config, seed, recoloured=False, start=already_seen)
        trainer.fit(refine_stage, train_dataloaders=loader)
        refine_steps_done = trainer.global_step
        refine_stage.finish()
    total_seconds = time.monotonic() - started

    done = (vae_steps_done, diffusion_steps_done, refine_steps_done)
    if any(steps < wanted for steps, wanted in zip(done, (config.vae_steps, config.diffusion_steps, config.refine_steps))):
        warnings.warn(
            f"the {max_minutes} min cap stopped training early (VAE {vae_steps_done}/{config.vae_steps}, "
            f"diffusion {diffusion_steps_done}/{config.diffusion_steps}, refinement "
            f"{refine_steps_done}/{config.refine_steps} steps); the weights are not reproducible",
            stacklevel=2,
        )
    pipeline = assemble_pipeline(vae, unet.eval(), text_encoder.eval())
    save_fp16(pipeline, output)
    summary = {
        "seed": seed,
        "config": dataclasses.asdict(config),
        "vae_steps_done": vae_steps_done,
        "diffusion_steps_done": diffusion_steps_done,
        "refine_steps_done": refine_steps_done,
        "vae_seconds": round(vae_seconds, 1),
        "diffusion_seconds": round(diffusion_seconds, 1),
        "refine_seconds": round(total_seconds - vae_seconds - diffusion_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "latent_scaling_factor": scaling_factor,
        "heldout_vae_psnr": round(vae_psnr, 3),
        "parameters": {
            name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in ("vae", "unet", "text_encoder")
        },
    }
    (Path(output) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: Optional[list[str]] = None) -> None:
    """`nti train-demo`: trains the `shapes` model (the arguments after "train-demo").

    Args:
        args (`list[str]`, *optional*): command-line arguments; defaults to `sys.argv[2:]`.
    """
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="nti train-demo", description="Train the small text-to-image 'shapes' model on procedural images."
    )
    parser.add_argument("--output", required=True, help="diffusers folder to write (fp16 safetensors)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and noise (default 0)")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock cap of the whole run (default 60)")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--diffusion-steps", type=int, default=defaults.diffusion_steps)
    parser.add_argument("--refine-steps", type=int, default=defaults.refine_steps)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-dir", default="runs/train-demo", help="TensorBoard log folder ('' for none)")
    parsed = parser.parse_args(args)
    if parsed.threads:
        torch.set_num_threads(parsed.threads)
    config = dataclasses.replace(
        defaults, vae_steps=parsed.vae_steps, diffusion_steps=parsed.diffusion_steps, refine_steps=parsed.refine_steps
    )
    summary = train_demo(parsed.output, parsed.seed, parsed.max_minutes, config, parsed.log_dir or None)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
