"""A plain, one-image-at-a-time implementation of SPEC.md's SDXL section: tests/reference.py's loop
with SDXL's condition.

It shares no code with `nti_lightning`: diffusers' own `StableDiffusionXLPipeline.encode_prompt`
for the condition (token embeddings and pooled embedding; the negative is zeros when
`force_zeros_for_empty_prompt`, else the encoding of ""), the pipeline's `_get_add_time_ids` for
the micro-conditioning `(R, R, 0, 0, R, R)`, its own DDIM next step, diffusers' `DDIMScheduler.step`
for the previous step, ONE fresh Adam per timestep over the null PAIR (token embeddings, pooled)
and `.item()` early stopping, all in fp32 on the CPU. The tests hold the package to it.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from reference import ReferenceNullInversion


class ReferenceNullInversionXL(ReferenceNullInversion):
    """The reference loop for SDXL (ε-prediction only, like the authors' code): a condition is the
    pair (token embeddings, pooled embedding), and the null pair is optimised by one Adam."""

    null_keys = ("null_embeddings", "null_pooled_embeddings")

    def __init__(self, pipe: StableDiffusionXLPipeline, num_ddim_steps: int = 50, guidance_scale: float = 7.5):
        super().__init__(pipe, num_ddim_steps=num_ddim_steps, guidance_scale=guidance_scale)
        self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.time_ids = pipe._get_add_time_ids(
            (self.resolution, self.resolution), (0, 0), (self.resolution, self.resolution),
            dtype=torch.float32, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )  # [1, 6]

    def noise(self, latents, t, context):
        """The UNet on `latents` with token embeddings and pooled embeddings `context` (one per row)."""
        embeddings, pooled = context
        time_ids = self.time_ids.repeat(latents.shape[0], 1)
        return self.pipe.unet(
            latents, t, encoder_hidden_states=embeddings,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample

    @torch.no_grad()
    def context(self, prompt: str):
        """`(uncond, cond, uncond_pooled, cond_pooled)`: diffusers' own SDXL encoding (no grad, fp32)."""
        cond, uncond, cond_pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return uncond.float(), cond.float(), uncond_pooled.float(), cond_pooled.float()

    def conditions(self, prompt: str):
        uncond, cond, uncond_pooled, cond_pooled = self.context(prompt)
        return (uncond, uncond_pooled), (cond, cond_pooled)

    @torch.no_grad()
    def image2latent(self, pixels):
        """pixels: [1, 3, H, W] in [-1, 1]; the VAE in fp32 (SDXL's overflows in fp16)."""
        vae = self.pipe.vae
        return vae.encode(pixels.float()).latent_dist.mean * vae.config.scaling_factor

    def invert(self, pixels, prompt: str, num_inner_steps: int = 10, epsilon: float = 1e-5) -> dict:
        result = super().invert(pixels, prompt, num_inner_steps=num_inner_steps, epsilon=epsilon)
        return {**result, "time_ids": [float(v) for v in self.time_ids[0].tolist()]}

    @torch.no_grad()
    def reconstruct(self, z_T, null_embeddings, null_pooled_embeddings, prompt: str,
                    guidance_scale: float | None = None):
        """The notebook's text2image_ldm_stable with per-step null pairs, no controller."""
        return self.sample(z_T, (null_embeddings, null_pooled_embeddings), prompt, guidance_scale)
