"""`DemoConfig`: the architecture and training settings of the `shapes` model, in one dataclass.

Every stage of `nti_lightning.demo.train` reads its sizes, step counts, rates and loss weights
from here; `nti train-demo` overrides only the step counts.
"""

from __future__ import annotations

from dataclasses import dataclass


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
