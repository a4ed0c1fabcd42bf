"""A plain, one-image-at-a-time implementation of SPEC.md's SDXL section, after tests/reference.py.

It shares no code with `nti_lightning`: diffusers' own `StableDiffusionXLPipeline.encode_prompt`
for the condition (token embeddings and pooled embedding; the negative is zeros when
`force_zeros_for_empty_prompt`, else the encoding of ""), the pipeline's `_get_add_time_ids` for
the micro-conditioning `(R, R, 0, 0, R, R)`, its own DDIM next step, diffusers' `DDIMScheduler.step`
for the previous step, ONE fresh Adam per timestep over the null PAIR (token embeddings, pooled)
and `.item()` early stopping, all in fp32 on the CPU. The tests hold the package to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionXLPipeline


class ReferenceNullInversionXL:
    """The reference loop for SDXL (ε-prediction only, like the authors' code)."""

    def __init__(self, pipe: StableDiffusionXLPipeline, num_ddim_steps: int = 50, guidance_scale: float = 7.5):
        self.pipe = pipe
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        self.scheduler.set_timesteps(num_ddim_steps)
        self.num_ddim_steps = num_ddim_steps
        self.guidance_scale = guidance_scale
        self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.time_ids = pipe._get_add_time_ids(
            (self.resolution, self.resolution), (0, 0), (self.resolution, self.resolution),
            dtype=torch.float32, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )  # [1, 6]

    # --- DDIM, as in the notebook
    def next_step(self, model_output, timestep: int, sample):
        timestep, next_timestep = (
            min(timestep - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps, 999),
            timestep,
        )
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep] if timestep >= 0 else self.scheduler.final_alpha_cumprod
        alpha_prod_t_next = self.scheduler.alphas_cumprod[next_timestep]
        beta_prod_t = 1 - alpha_prod_t
        next_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * model_output
        return alpha_prod_t_next**0.5 * next_original_sample + next_sample_direction

    def prev_step(self, model_output, timestep: int, sample):
        return self.scheduler.step(model_output, timestep, sample, eta=0.0).prev_sample

    def noise(self, latents, t, context, pooled):
        """The UNet on `latents` with token embeddings `context` and pooled embeddings `pooled` (one per row)."""
        time_ids = self.time_ids.repeat(latents.shape[0], 1)
        return self.pipe.unet(
            latents, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample

    @torch.no_grad()
    def context(self, prompt: str):
        """`(uncond, cond, uncond_pooled, cond_pooled)`: diffusers' own SDXL encoding (no grad, fp32)."""
        cond, uncond, cond_pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return uncond.float(), cond.float(), uncond_pooled.float(), cond_pooled.float()

    @torch.no_grad()
    def image2latent(self, pixels):
        """pixels: [1, 3, H, W] in [-1, 1]; the VAE in fp32 (SDXL's overflows in fp16)."""
        vae = self.pipe.vae
        return vae.encode(pixels.float()).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def ddim_loop(self, latent, cond, cond_pooled):
        all_latent = [latent]
        latent = latent.clone().detach()
        for i in range(self.num_ddim_steps):
            t = self.scheduler.timesteps[len(self.scheduler.timesteps) - i - 1]
            latent = self.next_step(self.noise(latent, t, cond, cond_pooled), int(t), latent)
            all_latent.append(latent)
        return all_latent

    def null_optimization(self, latents, uncond, cond, uncond_pooled, cond_pooled, num_inner_steps: int,
                          epsilon: float):
        uncond_list, pooled_list, iterations, final_losses = [], [], [], []
        latent_cur = latents[-1]
        for i in range(self.num_ddim_steps):
            uncond = uncond.clone().detach()
            uncond.requires_grad = True
            uncond_pooled = uncond_pooled.clone().detach()
            uncond_pooled.requires_grad = True
            optimizer = torch.optim.Adam([uncond, uncond_pooled], lr=1e-2 * (1.0 - i / 100.0))
            latent_prev = latents[len(latents) - i - 2]
            t = self.scheduler.timesteps[i]
            with torch.no_grad():
                noise_pred_cond = self.noise(latent_cur, t, cond, cond_pooled)
            for j in range(num_inner_steps):
                noise_pred_uncond = self.noise(latent_cur, t, uncond, uncond_pooled)
                noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_cond - noise_pred_uncond)
                latents_prev_rec = self.prev_step(noise_pred, t, latent_cur)
                loss = F.mse_loss(latents_prev_rec, latent_prev)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_item = loss.item()
                if loss_item < epsilon + i * 2e-5:
                    break
            iterations.append(j + 1)
            final_losses.append(loss_item)
            uncond_list.append(uncond[:1].detach())
            pooled_list.append(uncond_pooled[:1].detach())
            with torch.no_grad():
                noise = self.noise(
                    torch.cat([latent_cur] * 2), t, torch.cat([uncond, cond]), torch.cat([uncond_pooled, cond_pooled])
                )
                noise_uncond, noise_cond = noise.chunk(2)
                noise_pred = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
                latent_cur = self.prev_step(noise_pred, t, latent_cur)
        return uncond_list, pooled_list, iterations, final_losses, latent_cur

    def invert(self, pixels, prompt: str, num_inner_steps: int = 10, epsilon: float = 1e-5) -> dict:
        for part in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            part.requires_grad_(False)
        uncond, cond, uncond_pooled, cond_pooled = self.context(prompt)
        latent = self.image2latent(pixels)
        ddim_latents = self.ddim_loop(latent, cond, cond_pooled)
        embeddings, pooled, iterations, losses, reconstruction = self.null_optimization(
            ddim_latents, uncond, cond, uncond_pooled, cond_pooled, num_inner_steps, epsilon
        )
        return {
            "z_T": ddim_latents[-1][0],
            "source_latent": latent[0],
            "null_embeddings": torch.cat(embeddings),
            "null_pooled_embeddings": torch.cat(pooled),
            "time_ids": [float(v) for v in self.time_ids[0].tolist()],
            "inner_iterations": iterations,
            "final_losses": losses,
            "reconstruction": reconstruction,
            "pivot": torch.cat(ddim_latents),
        }

    @torch.no_grad()
    def reconstruct(self, z_T, null_embeddings, null_pooled_embeddings, prompt: str,
                    guidance_scale: float | None = None):
        """The notebook's text2image_ldm_stable with per-step null pairs, no controller."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        _, cond, _, cond_pooled = self.context(prompt)
        latents = z_T[None]
        for i, t in enumerate(self.scheduler.timesteps):
            context = torch.cat([null_embeddings[i : i + 1], cond])
            pooled = torch.cat([null_pooled_embeddings[i : i + 1], cond_pooled])
            noise = self.noise(torch.cat([latents] * 2), t, context, pooled)
            noise_uncond, noise_cond = noise.chunk(2)
            latents = self.prev_step(noise_uncond + w * (noise_cond - noise_uncond), t, latents)
        return latents
