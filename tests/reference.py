"""A plain, one-image-at-a-time implementation of docs/ALGORITHM.md, written after the authors' notebook.

It shares no code with `nti_lightning`: its own DDIM next step, diffusers' `DDIMScheduler.step`
for the previous step, its own prompt encoding, a fresh Adam per timestep and `.item()` early
stopping, all in fp32 on the CPU. The tests hold the package to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline


class ReferenceNullInversion:
    """The reference loop (ε-prediction only, like the authors' code)."""

    def __init__(self, pipe: StableDiffusionPipeline, num_ddim_steps: int = 50, guidance_scale: float = 7.5):
        self.pipe = pipe
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        self.scheduler.set_timesteps(num_ddim_steps)
        self.num_ddim_steps = num_ddim_steps
        self.guidance_scale = guidance_scale

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

    def noise(self, latents, t, context):
        """The UNet on `latents` under `context`: the tuple of tensors a condition is made of, one
        row per latent (here the token embeddings alone; SDXL adds its pooled embedding)."""
        (embeddings,) = context
        return self.pipe.unet(latents, t, encoder_hidden_states=embeddings).sample

    @torch.no_grad()
    def context(self, prompt: str):
        tok = self.pipe.tokenizer

        def ids(text):
            return tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids

        uncond = self.pipe.text_encoder(ids(""))[0]
        cond = self.pipe.text_encoder(ids(prompt))[0]
        return uncond, cond

    def conditions(self, prompt: str):
        """`(uncond, cond)`, each the tuple of tensors `noise` takes."""
        uncond, cond = self.context(prompt)
        return (uncond,), (cond,)

    #: The result keys of the per-step null tensors, in the order of a condition's tensors.
    null_keys = ("null_embeddings",)

    @torch.no_grad()
    def image2latent(self, pixels):
        """pixels: [1, 3, H, W] in [-1, 1]."""
        return self.pipe.vae.encode(pixels).latent_dist.mean * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def ddim_loop(self, latent, cond):
        all_latent = [latent]
        latent = latent.clone().detach()
        for i in range(self.num_ddim_steps):
            t = self.scheduler.timesteps[len(self.scheduler.timesteps) - i - 1]
            latent = self.next_step(self.noise(latent, t, cond), int(t), latent)
            all_latent.append(latent)
        return all_latent

    def null_optimization(self, latents, uncond, cond, num_inner_steps: int, epsilon: float):
        """The notebook's loop; `uncond` and `cond` are tuples of tensors, and ONE fresh Adam per
        timestep optimises every tensor of `uncond` together."""
        uncond_list, iterations, final_losses, checked = [], [], [], []
        latent_cur = latents[-1]
        for i in range(self.num_ddim_steps):
            uncond = tuple(part.clone().detach().requires_grad_() for part in uncond)
            optimizer = torch.optim.Adam(list(uncond), lr=1e-2 * (1.0 - i / 100.0))
            latent_prev = latents[len(latents) - i - 2]
            t = self.scheduler.timesteps[i]
            with torch.no_grad():
                noise_pred_cond = self.noise(latent_cur, t, cond)
            for j in range(num_inner_steps):
                noise_pred_uncond = self.noise(latent_cur, t, uncond)
                noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_cond - noise_pred_uncond)
                latents_prev_rec = self.prev_step(noise_pred, t, latent_cur)
                loss = F.mse_loss(latents_prev_rec, latent_prev)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_item = loss.item()
                checked.append((i, loss_item))
                if loss_item < epsilon + i * 2e-5:
                    break
            iterations.append(j + 1)
            final_losses.append(loss_item)
            uncond_list.append(tuple(part[:1].detach() for part in uncond))
            with torch.no_grad():
                both = tuple(torch.cat([u, c]) for u, c in zip(uncond, cond))
                noise = self.noise(torch.cat([latent_cur] * 2), t, both)
                noise_uncond, noise_cond = noise.chunk(2)
                noise_pred = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
                latent_cur = self.prev_step(noise_pred, t, latent_cur)
        return uncond_list, iterations, final_losses, checked, latent_cur

    def pivot(self, pixels, prompt: str):
        """The frozen networks, the prompt's (∅, C), the VAE latent and its w = 1 DDIM inversion."""
        for part in self.pipe.components.values():
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False)
        uncond, cond = self.conditions(prompt)
        latent = self.image2latent(pixels)
        return uncond, cond, latent, self.ddim_loop(latent, cond)

    def invert(self, pixels, prompt: str, num_inner_steps: int = 10, epsilon: float = 1e-5) -> dict:
        uncond, cond, latent, ddim_latents = self.pivot(pixels, prompt)
        nulls, iterations, losses, checked, reconstruction = self.null_optimization(
            ddim_latents, uncond, cond, num_inner_steps, epsilon
        )
        return {
            "z_T": ddim_latents[-1][0],
            "source_latent": latent[0],
            **{key: torch.cat(steps) for key, steps in zip(self.null_keys, zip(*nulls))},
            "inner_iterations": iterations,
            "final_losses": losses,
            # every (step, loss) the early stop compared with its threshold ε + step·2e-5
            "checked_losses": checked,
            "reconstruction": reconstruction,
            "pivot": torch.cat(ddim_latents),
        }

    @torch.no_grad()
    def direct_inversion(self, pixels, prompt: str) -> dict:
        """Direct Inversion (Ju et al. 2024) as cure-lab/PnPInversion computes it
        (`offset_calculate`): the w = 1 pivot, then from z_T per step the guided step with ∅ and
        the source prompt, its offset to the pivot, and the next step from `step + offset`."""
        uncond, cond, latent, latents = self.pivot(pixels, prompt)
        offsets, latent_cur = [], latents[-1]
        for i in range(self.num_ddim_steps):
            latent_prev = latents[len(latents) - i - 2]
            t = self.scheduler.timesteps[i]
            both = tuple(torch.cat([u, c]) for u, c in zip(uncond, cond))
            noise_uncond, noise_cond = self.noise(torch.cat([latent_cur] * 2), t, both).chunk(2)
            rec = self.prev_step(noise_uncond + self.guidance_scale * (noise_cond - noise_uncond), t, latent_cur)
            offsets.append(latent_prev - rec)
            latent_cur = rec + offsets[-1]
        return {"z_T": latents[-1][0], "source_latent": latent[0], "offsets": torch.cat(offsets),
                "null_embeddings": uncond[0].expand(self.num_ddim_steps, -1, -1)}

    @torch.no_grad()
    def sample_direct(self, z_T, null_embeddings, offsets, prompts: list[str]):
        """PnPInversion's editing loop without a controller: `prompts[0]` is the source, whose
        row gets the step's offset after every step."""
        w = self.guidance_scale
        conds = [self.conditions(prompt)[1] for prompt in prompts]
        cond = tuple(torch.cat(parts) for parts in zip(*conds))
        latents = z_T[None].expand(len(prompts), -1, -1, -1)
        for i, t in enumerate(self.scheduler.timesteps):
            null = null_embeddings[i : i + 1].expand(len(prompts), -1, -1)
            context = (torch.cat([null, cond[0]]),)
            noise_uncond, noise_cond = self.noise(torch.cat([latents] * 2), t, context).chunk(2)
            latents = self.prev_step(noise_uncond + w * (noise_cond - noise_uncond), t, latents)
            latents = torch.cat([latents[:1] + offsets[i : i + 1], latents[1:]])
        return latents

    @torch.no_grad()
    def reconstruct(self, z_T, null_embeddings, prompt: str, guidance_scale: float | None = None):
        """The notebook's text2image_ldm_stable with per-step null embeddings, no controller."""
        return self.sample(z_T, (null_embeddings,), prompt, guidance_scale)

    @torch.no_grad()
    def sample(self, z_T, nulls, prompt: str, guidance_scale: float | None = None):
        """Guided DDIM sampling from `z_T` with step i's unconditional tensors `nulls[k][i]`."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        _, cond = self.conditions(prompt)
        latents = z_T[None]
        for i, t in enumerate(self.scheduler.timesteps):
            context = tuple(torch.cat([null[i : i + 1], c]) for null, c in zip(nulls, cond))
            noise = self.noise(torch.cat([latents] * 2), t, context)
            noise_uncond, noise_cond = noise.chunk(2)
            latents = self.prev_step(noise_uncond + w * (noise_cond - noise_uncond), t, latents)
        return latents


#: How far, relative, every loss the reference compares with its early-stop threshold stays from
#: it at an ε that `clear_stopping_epsilon` picks. Runs that the tests expect to stop alike (a batch
#: and its singles, two schedulings, one process and two) differ in their losses by float rounding
#: alone: under 4e-5 relative over a whole walk on the independent pipeline (batched vs single,
#: both schedulings). 1% leaves a factor of 250 over that, so which step stops after how many
#: iterations cannot hang on how one CPU's kernels round a loss that sits on the threshold.
STOP_MARGIN = 0.01


def clear_stopping_epsilon(
    reference: ReferenceNullInversion,
    inputs: Sequence[tuple[torch.Tensor, str]],
    num_inner_steps: int,
    wanted: Callable[[list[dict]], bool] | None = None,
    margin: float = STOP_MARGIN,
) -> float:
    """An early-stop ε for tests that compare iteration counts, chosen on this machine's losses.

    Starting from the median final loss of the first input, it tries ε a sixteenth of an octave
    apart until one leaves every loss the reference compares (for each `(pixels, prompt)` of
    `inputs`, pixels `[1, 3, H, W]`) at least `margin` away from its threshold and meets `wanted`
    (by default: the first input has steps that stop after one iteration and steps that run all
    `num_inner_steps`).
    """
    if wanted is None:
        def wanted(results):
            return {1, num_inner_steps} <= set(results[0]["inner_iterations"])
    pixels, prompt = inputs[0]
    guess = float(np.median(reference.invert(pixels, prompt, num_inner_steps, epsilon=1e-5)["final_losses"]))
    closest = {}
    for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8):
        epsilon = guess * 2 ** (k / 16)
        results = [reference.invert(pixels, prompt, num_inner_steps, epsilon=epsilon) for pixels, prompt in inputs]
        closest[epsilon] = min(
            abs(loss / (epsilon + step * 2e-5) - 1) for result in results for step, loss in result["checked_losses"]
        )
        if closest[epsilon] >= margin and wanted(results):
            return epsilon
    raise AssertionError(f"no early-stop ε near {guess:.4g} clears every loss by {margin:.0%}: {closest}")
