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

The code, one concern a module:

- `config`: `DemoConfig`, the architecture and settings;
- `components`: the untrained VAE, UNet and text encoder, and the warm-up + cosine schedule;
- `vae_stage`: `VAEStage`, the latent scaling factor and the held-out VAE PSNR;
- `grounding`: the cross-attention recorder and the token positions the grounding loss reads;
- `diffusion_stage`: `DiffusionStage` (the diffusion stage and the refinement);
- `export`: `save_fp16`, the shipped folder;
- `run`: `train_demo`, the whole run, and `main`, its command line.

Every public name is also importable from here.
"""

from nti_lightning.demo.train.components import (
    build_text_encoder,
    build_unet,
    build_vae,
    warmup_cosine,
)
from nti_lightning.demo.train.config import DemoConfig
from nti_lightning.demo.train.diffusion_stage import DiffusionStage
from nti_lightning.demo.train.export import save_fp16
from nti_lightning.demo.train.grounding import (
    RecordingCrossAttnProcessor,
    grounded_token_positions,
)
from nti_lightning.demo.train.run import ProgressPrinter, main, train_demo
from nti_lightning.demo.train.vae_stage import (
    VAEStage,
    heldout_vae_psnr,
    latent_scaling_factor,
)

__all__ = [
    "DemoConfig",
    "DiffusionStage",
    "ProgressPrinter",
    "RecordingCrossAttnProcessor",
    "VAEStage",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "grounded_token_positions",
    "heldout_vae_psnr",
    "latent_scaling_factor",
    "main",
    "save_fp16",
    "train_demo",
    "warmup_cosine",
]
