"""Plain, one-image-at-a-time oracles of three more inversions, written after their authors' code.

* Edit-friendly DDPM inversion: inbarhub/DDPM_inversion `ddm_inversion/inversion_utils.py`
  (`sample_xts_from_x0`, `get_variance`, `inversion_forward_process`, `reverse_step`,
  `inversion_reverse_process`; cure-lab/PnPInversion `models/edit_friendly_ddm/inversion_utils.py`
  is the same code), settings from PnPInversion `run_editing_edit_friendly_p2p.py`.
* ProxNPI: phymhan/prompt-to-prompt `negative_prompt_inversion.py` (`NegativePromptInversion`) and
  `ptp_utils.py` (`diffusion_step`, `dilate`); PnPInversion `models/p2p/proximal_guidance_forward.py`
  (`proximal_guidance_diffusion_step`, the same step), `models/p2p/scheduler_dev.py`
  (`DDIMSchedulerDev.step`) and `models/p2p_editor.py` with `run_editing_p2p.py`'s settings.
* EDICT: salesforce/EDICT `edict_functions.py` (`coupled_stablediffusion`, `forward_step`,
  `reverse_step`, `get_alpha_and_beta`; PnPInversion `models/edict/edict_functions.py` is the same).

Nothing here comes from `nti_lightning`. Like `reference.py`, every method is built on a diffusers
`StableDiffusionPipeline` and uses a DDIM scheduler made from its config (`steps_offset` 1 for SD:
with T steps the timesteps are `set_timesteps(T)`'s, 981 ... 1 at T = 50), its `alphas_cumprod` and
`final_alpha_cumprod` (EDICT may instead use its authors' own schedule: `authors_schedule=True`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline

#: `on_step(step, t, latents) -> latents`: called after every sampling step on the whole batch, where
#: the authors call their Prompt-to-Prompt controller's `step_callback` (LocalBlend); `step` counts
#: the steps of this sampling loop from 0.
StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class _Parts:
    """The pipeline's networks and a DDIM scheduler made as `reference.py` makes it."""

    def __init__(self, pipe: StableDiffusionPipeline, num_steps: int = 50):
        self.pipe = pipe
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        self.scheduler.set_timesteps(num_steps)
        self.num_steps = num_steps
        self.stride = self.scheduler.config.num_train_timesteps // num_steps

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Every script's `encode_text` / `init_prompt`: CLIP token embeddings, padded to 77."""
        tok = self.pipe.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0]

    def unet(self, latents, t, embeddings):
        return self.pipe.unet(latents, t, encoder_hidden_states=embeddings).sample

    @torch.no_grad()
    def image2latent(self, pixels):
        """pixels: [1, 3, H, W] in [-1, 1] (the authors: the VAE's mean, or its mode, x 0.18215)."""
        return self.pipe.vae.encode(pixels).latent_dist.mean * self.pipe.vae.config.scaling_factor

    def alpha_prev(self, t):
        """`alphas_cumprod[t - stride]`, or `final_alpha_cumprod` below 0 (every authors' step)."""
        prev = int(t) - self.stride
        return self.scheduler.alphas_cumprod[prev] if prev >= 0 else self.scheduler.final_alpha_cumprod


# ----------------------------------------------------------------------------------------------------
# Edit-friendly DDPM inversion (Huberman-Spiegelglas et al.)
# ----------------------------------------------------------------------------------------------------
class ReferenceDDPMInversion(_Parts):
    """Conventions (ours <-> the authors'; T steps, `ts = scheduler.timesteps`, descending):

    * `xts` is x_T FIRST: `xts[k]` is x at `ts[k]` for k < T, `xts[T]` is x0. The authors' `xts`
      is x0 first: their `xts[j]` is our `xts[T - j]`.
    * `zs[k]` is the map of sampling step k (from `ts[k]` to `ts[k + 1]`, the last from `ts[T-1]`
      to x0); the authors' `zs[j]` is our `zs[T - 1 - j]`. They zero their `zs[0]`, our `zs[T-1]`.
    * An edit with `skip` starts from our `xts[skip]` (the authors' `wts[T - skip]`), runs
      `ts[skip:]` with `zs[skip:]` (their `zs[:T - skip]`): T - skip steps.
    * Noise: `sample_xts_from_x0` draws T tensors of x0's shape in ASCENDING t = ts[T-1], ..., ts[0]
      (1, 21, ..., 981 at T = 50); draw j makes our `xts[T - 1 - j]`. The authors call
      `torch.randn_like(x0)` on the global RNG; here `torch.randn(x0.shape, generator=generator)`,
      which is the same stream with `generator=None`. `noise=[...]` gives the T draws in that order.
    * sigma_t (their `get_variance`, eta = 1): with a = alphas_cumprod[t], a' = alphas_cumprod[t -
      stride] (final_alpha_cumprod below 0), var = (1 - a') / (1 - a) * (1 - a / a'), sigma = var ** .5;
      mean = a' ** .5 * (x - (1 - a) ** .5 eps) / a ** .5 + (1 - a' - var) ** .5 eps.
    """

    def mean_sigma(self, eps, t, x):
        """The DDPM (eta = 1) mean of the next x and sigma_t, as `reverse_step` and the forward
        process compute them (the same expressions, so the write-back and the sampling agree)."""
        alpha_prod_t = self.scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = self.alpha_prev(t)
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (x - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
        # get_variance
        variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        pred_sample_direction = (1 - alpha_prod_t_prev - 1 * variance) ** (0.5) * eps
        return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction, 1 * variance ** 0.5

    def draw_noise(self, x0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The T draws of `sample_xts_from_x0`, in its order (ascending t)."""
        return [torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
                for _ in range(self.num_steps)]

    @torch.no_grad()
    def invert(self, x0, prompt: str, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
               noise: Sequence[torch.Tensor] | None = None, keep_last_map: bool = True):
        """x0: [1, C, h, w]. Returns `(xts [T+1, C, h, w], zs [T, C, h, w])` in the orders above."""
        T, ts = self.num_steps, self.scheduler.timesteps
        alpha_bar = self.scheduler.alphas_cumprod
        # sample_xts_from_x0: every x_t drawn independently from x0, t ascending
        noise = self.draw_noise(x0, generator) if noise is None else list(noise)
        assert len(noise) == T
        xts: list = [None] * T + [x0]
        for j in range(T):
            k = T - 1 - j
            t = ts[k]
            xts[k] = x0 * (alpha_bar[t] ** 0.5) + noise[j] * (1 - alpha_bar[t]) ** 0.5
        # inversion_forward_process: "" alone when the prompt is "" (cfg_scale then unused), else CFG
        uncond = self.embed([""])
        cond = self.embed([prompt]) if prompt != "" else None
        zs = []
        for k, t in enumerate(ts):
            xt = xts[k]  # already corrected by the previous step's write-back
            eps = self.unet(xt, t, uncond)
            if cond is not None:
                eps = eps + guidance_scale * (self.unet(xt, t, cond) - eps)
            mu, sigma = self.mean_sigma(eps, t, xt)
            z = (xts[k + 1] - mu) / sigma
            zs.append(z)
            # "correction to avoid error accumulation": later steps see mu + sigma z (the authors
            # write the last one over x0 too: their returned xts[0] is mu + sigma z, not x0)
            xts[k + 1] = mu + sigma * z
        if not keep_last_map:  # the authors: zs[0] = 0, the step into x0
            zs[-1] = torch.zeros_like(zs[-1])
        return torch.cat(xts), torch.cat(zs)

    @torch.no_grad()
    def sample(self, x_start, zs, prompts: Sequence[str], guidance_scale: float | Sequence[float] = 7.5,
               skip: int = 0, on_step: StepHook | None = None):
        """inversion_reverse_process with eta = 1: one row per prompt, all from `x_start` (x at
        `ts[skip]`, i.e. `xts[skip]`), step k adds sigma_t `zs[k]` (the same map on every row).
        The UNet runs twice per step on the whole batch: "" rows, then prompt rows; CFG always
        (the authors' `if prompts:` holds for any non-empty list), w per row."""
        B, ts = len(prompts), self.scheduler.timesteps
        scales = [guidance_scale] * B if isinstance(guidance_scale, (int, float)) else list(guidance_scale)
        w = torch.Tensor(scales).view(-1, 1, 1, 1).to(zs.device)  # cfg_scales_tensor, float32
        uncond, cond = self.embed([""] * B), self.embed(list(prompts))
        x = x_start.reshape(1, *x_start.shape[-3:]).expand(B, -1, -1, -1)
        for step, k in enumerate(range(skip, self.num_steps)):
            t = ts[k]
            eps_uncond = self.unet(x, t, uncond)
            eps_cond = self.unet(x, t, cond)
            eps = eps_uncond + w * (eps_cond - eps_uncond)
            mu, sigma = self.mean_sigma(eps, t, x)
            x = mu + sigma * zs[k][None].expand(B, -1, -1, -1)  # reverse_step: prev_sample + sigma_z
            if on_step is not None:  # controller.step_callback(xt)
                x = on_step(step, t, x)
        return x


def ddpm_invert(pipe, x0, prompt: str, num_steps: int = 50, guidance_scale: float = 1.0,
                generator: torch.Generator | None = None, *, noise: Sequence[torch.Tensor] | None = None,
                keep_last_map: bool = True):
    """`(xts, zs)`: xts[0] = x_T ... xts[T] = x0; zs[k] the map of step k (see ReferenceDDPMInversion)."""
    return ReferenceDDPMInversion(pipe, num_steps).invert(x0, prompt, guidance_scale, generator, noise, keep_last_map)


def ddpm_sample(pipe, x_start, zs, prompts: Sequence[str], guidance_scale: float | Sequence[float] = 7.5,
                skip: int = 0, *, on_step: StepHook | None = None):
    """The edit from `x_start = xts[skip]` with `zs[skip:]` (zs holds all T maps); [len(prompts), C, h, w]."""
    return ReferenceDDPMInversion(pipe, len(zs)).sample(x_start, zs, prompts, guidance_scale, skip, on_step)


# ----------------------------------------------------------------------------------------------------
# ProxNPI: negative-prompt inversion + proximal guidance (Han et al.)
# ----------------------------------------------------------------------------------------------------
class ReferenceProxNPI(_Parts):
    """Facts from `ptp_utils.diffusion_step` (= PnPInversion's `proximal_guidance_diffusion_step`):

    * One UNet call per step on `cat([latents] * 2)` with context `[null] * B + conds`; the null
      of every row is the SOURCE prompt's embedding (negative-prompt inversion).
    * delta = eps_cond - eps_uncond over the whole batch [B, C, h, w]. threshold = `delta.abs()
      .quantile(q)`: ONE scalar over every element of every row and channel (the source row, whose
      delta is 0, included); q <= 0 means a fixed threshold -q.
    * "l0": `delta -= delta.clamp(-th, th)`: zero where |delta| <= th and |delta| - th (sign kept)
      above, i.e. soft shrinkage. "l1": then `where(d > 0, d - th)`, then `where(d < 0, d + th)`
      applied in turn (so for th < delta < 2 th it is delta - th, for -2 th < delta < -th it is
      delta + 2 th > 0). eps = eps_uncond + w * delta.
    * When `(recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t)` (strict `<`): the mask
      `mask_edit = (|shrunk delta| > th)` per element (so |delta| > 2 th for l0), dilated by
      `max_pool2d(kernel 2r + 1, stride 1, padding r)` over h, w per row and channel when r =
      `dilate_mask` > 0; `recon_mask = 1 - mask_edit`.
    * Reconstruction guidance (`image_latent`, inside DDIMSchedulerDev.step): the predicted x0 is
      pulled toward the image latent where recon_mask is 1: x0 -= recon_lr (x0 - image) recon_mask.
    * Inversion guidance (after the step, every row with its own mask): latents -= recon_lr
      (latents - x_stars[T - 1 - i]) recon_mask, i.e. toward the DDIM inversion's latent at the
      timestep the step lands on (x_stars[0] = x0 ... x_stars[T] = x_T).
    * Then `controller.step_callback` (here `on_step`).

    Settings: ProxNPI's README (use_inversion_guidance=True, l0, q 0.75, recon_lr 1, recon_t 400,
    dilate_mask 1 by default). PnPInversion's run passes those, but its `P2PEditor` never forwards
    `inversion_guidance` (stays False) and passes `image_enc=None`: its benchmark row computes the
    mask and uses it for nothing; only the thresholding acts (`inversion_guidance=False` here).
    """

    def next_step(self, model_output, timestep: int, sample):
        """NegativePromptInversion.next_step (the notebook's DDIM inversion step)."""
        timestep, next_timestep = min(timestep - self.stride, 999), timestep
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep] if timestep >= 0 else self.scheduler.final_alpha_cumprod
        alpha_prod_t_next = self.scheduler.alphas_cumprod[next_timestep]
        beta_prod_t = 1 - alpha_prod_t
        next_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * model_output
        return alpha_prod_t_next**0.5 * next_original_sample + next_sample_direction

    def prev_step(self, model_output, timestep, sample, ref_image=None, recon_lr=0.0, recon_mask=None):
        """DDIMSchedulerDev.step, eta = 0, epsilon prediction, with its reconstruction guidance."""
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alpha_prev(timestep)
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        if ref_image is not None and recon_lr > 0.0:
            ref_image = ref_image.expand_as(pred_original_sample)
            if recon_mask is not None:
                recon_mask = recon_mask.expand_as(pred_original_sample).float()
                pred_original_sample = pred_original_sample - recon_lr * (pred_original_sample - ref_image) * recon_mask
            else:
                pred_original_sample = pred_original_sample - recon_lr * (pred_original_sample - ref_image)
        std_dev_t = 0.0
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * model_output
        return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    @torch.no_grad()
    def invert(self, x0, prompt: str):
        """NegativePromptInversion.invert: DDIM inversion with the prompt alone (w = 1).
        Returns `(x_stars [T+1, C, h, w] with x_stars[0] = x0 ... x_stars[T] = x_T, null [1, 77, D])`,
        null being the prompt's own embedding (npi_interp = 0)."""
        cond = self.embed([prompt])
        all_latent, latent = [x0], x0.clone()
        for i in range(self.num_steps):  # ddim_loop
            t = self.scheduler.timesteps[len(self.scheduler.timesteps) - i - 1]
            latent = self.next_step(self.unet(latent, t, cond), int(t), latent)
            all_latent.append(latent)
        return torch.cat(all_latent), cond

    @staticmethod
    def proximal(delta, prox: str, quantile: float):
        """The thresholded guidance difference and the threshold (see the class docstring)."""
        threshold = delta.abs().quantile(quantile) if quantile > 0 else -quantile
        if prox == "l1":
            delta = delta - delta.clamp(-threshold, threshold)
            delta = torch.where(delta > 0, delta - threshold, delta)
            delta = torch.where(delta < 0, delta + threshold, delta)
        elif prox == "l0":
            delta = delta - delta.clamp(-threshold, threshold)
        else:
            raise NotImplementedError(prox)
        return delta, threshold

    @torch.no_grad()
    def sample(self, x_T, prompts: Sequence[str], null, guidance_scale: float = 7.5, prox: str | None = "l0",
               quantile: float = 0.75, recon_lr: float = 1.0, recon_t: int = 400, dilate_mask: int = 1,
               inversion_guidance: bool = True, x_stars=None, image_latent=None, on_step: StepHook | None = None):
        """proximal_guidance_forward / text2image_ldm_stable: one row per prompt (prompts[0] the
        source), all from `x_T`; `prox=None` is plain CFG (the NPI reconstruction / NPI edit)."""
        B = len(prompts)
        cond = self.embed(list(prompts))
        latents = x_T.reshape(1, *x_T.shape[-3:]).expand(B, -1, -1, -1)
        for i, t in enumerate(self.scheduler.timesteps):
            context = torch.cat([null.expand(*cond.shape), cond])
            eps_uncond, eps_cond = self.unet(torch.cat([latents] * 2), t, context).chunk(2)
            ref_image, lr, recon_mask, mask_edit = None, 0, None, None
            if prox is not None:
                delta, threshold = self.proximal(eps_cond - eps_uncond, prox, quantile)
                if (recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t):
                    ref_image, lr = image_latent, recon_lr
                    mask_edit = (delta.abs() > threshold).float()
                    if dilate_mask > 0:  # ptp_utils.dilate
                        r = int(dilate_mask)
                        mask_edit = F.max_pool2d(mask_edit.float(), 2 * r + 1, 1, r)
                    recon_mask = 1 - mask_edit
                eps = eps_uncond + guidance_scale * delta
            else:
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.prev_step(eps, t, latents, ref_image=ref_image, recon_lr=lr, recon_mask=recon_mask)
            # Python's precedence, as written by the authors: (A and B and C) or D
            if (mask_edit is not None and inversion_guidance and (recon_t > 0 and t < recon_t)) or (
                recon_t < 0 and t > -recon_t
            ):
                target = x_stars[len(x_stars) - i - 2].expand_as(latents)
                latents = latents - recon_lr * (latents - target) * (1 - mask_edit)
            if on_step is not None:  # controller.step_callback(latents)
                latents = on_step(i, t, latents)
        return latents


def npi_invert(pipe, x0, prompt: str, num_steps: int = 50):
    """`(x_stars, null)`: x_stars[0] = x0 ... x_stars[T] = x_T (DDIM inversion with the prompt), null = cond."""
    return ReferenceProxNPI(pipe, num_steps).invert(x0, prompt)


def proxnpi_sample(pipe, x_T, prompts: Sequence[str], null, num_steps: int = 50, **settings):
    """ReferenceProxNPI.sample; `settings`: guidance_scale, prox, quantile, recon_lr, recon_t,
    dilate_mask, inversion_guidance, x_stars, image_latent, on_step."""
    return ReferenceProxNPI(pipe, num_steps).sample(x_T, prompts, null, **settings)


# ----------------------------------------------------------------------------------------------------
# EDICT (Wallace et al.)
# ----------------------------------------------------------------------------------------------------
class ReferenceEDICT(_Parts):
    """`coupled_stablediffusion` without Prompt-to-Prompt. Conventions:

    * The pair (x, y) is held in float64 (the authors run every network in double; here the UNet
      runs in its own dtype on the pair cast to it, its outputs cast back to float64 before the
      guidance and the step, so the inverse steps see the same eps to the last bit).
    * The authors build their own DDIM scheduler (old diffusers, no steps_offset): timesteps
      `arange(0, 1000, 1000 // T)[::-1]` = 980 ... 0 at T = 50, alphas from float64 numpy betas,
      final_alpha_cumprod = alphas_cumprod[0] (so their last step, t = 0, is an identity). That is
      `authors_schedule=True`; by default the pipeline scheduler's timesteps (981 ... 1) and its
      alphas_cumprod / final_alpha_cumprod cast to float64.
    * prev = t - 1000 / T (true division); `get_alpha_and_beta` takes alphas_cumprod[t] for an
      integer t, final for prev < 0, and for a float prev `low * rem + high * (1 - rem)` (exact when
      T divides 1000).
    * strength s: t_limit = T - int(T * s); sampling runs `timesteps[t_limit:]` (the lowest
      int(T s) timesteps), the inversion the same, flipped (it ends at timesteps[t_limit]).
    * Sampling step i at t: for idx in (i % 2, 1 - i % 2): pair[idx] = forward_step(eps(pair[1 -
      idx], t), t, pair[idx]) (the second update sees the first's result); then mixing
      x = p x + (1 - p) y, y = (1 - p) x_new + p y. eps = uncond + w (cond - uncond), two UNet calls
      with batch 1. Inversion step i of n (orig = n - 1 - i): undo the mixing (y, then x), then
      reverse_step on index (orig + 1) % 2 first, then orig % 2.
    """

    def __init__(self, pipe: StableDiffusionPipeline, num_steps: int = 50, authors_schedule: bool = False):
        super().__init__(pipe, num_steps)
        config = self.scheduler.config
        self.num_train_timesteps = config.num_train_timesteps
        if authors_schedule:  # my_diffusers DDIMScheduler.__init__ / set_timesteps(steps), offset 0
            assert config.beta_schedule == "scaled_linear"
            betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps,
                                dtype=np.float64) ** 2
            self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas, axis=0))
            self.final_alpha_cumprod = self.alphas_cumprod[0]
            self.timesteps = torch.from_numpy(
                np.arange(0, config.num_train_timesteps, config.num_train_timesteps // num_steps)[::-1].copy())
        else:
            self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
            self.final_alpha_cumprod = torch.as_tensor(self.scheduler.final_alpha_cumprod).to(torch.float64)
            self.timesteps = self.scheduler.timesteps

    def get_alpha_and_beta(self, t):
        if t.dtype == torch.long:
            alpha = self.alphas_cumprod[t]
            return alpha, 1 - alpha
        if t < 0:
            return self.final_alpha_cumprod, 1 - self.final_alpha_cumprod
        low, high = t.floor().long(), t.ceil().long()
        rem = t - low
        alpha = self.alphas_cumprod[low] * rem + self.alphas_cumprod[high] * (1 - rem)
        return alpha, 1 - alpha

    def forward_step(self, model_output, timestep, sample):
        """Denoising: x at t -> x at t - 1000 / T."""
        prev_timestep = timestep - self.num_train_timesteps / self.num_steps
        alpha_prod_t, beta_prod_t = self.get_alpha_and_beta(timestep)
        alpha_prod_t_prev, _ = self.get_alpha_and_beta(prev_timestep)
        alpha_quotient = (alpha_prod_t / alpha_prod_t_prev) ** 0.5
        first_term = (1.0 / alpha_quotient) * sample
        second_term = (1.0 / alpha_quotient) * (beta_prod_t**0.5) * model_output
        third_term = ((1 - alpha_prod_t_prev) ** 0.5) * model_output
        return first_term - second_term + third_term

    def reverse_step(self, model_output, timestep, sample):
        """Its inverse: x at t - 1000 / T -> x at t (eps predicted at t)."""
        prev_timestep = timestep - self.num_train_timesteps / self.num_steps
        alpha_prod_t, beta_prod_t = self.get_alpha_and_beta(timestep)
        alpha_prod_t_prev, _ = self.get_alpha_and_beta(prev_timestep)
        alpha_quotient = (alpha_prod_t / alpha_prod_t_prev) ** 0.5
        first_term = alpha_quotient * sample
        second_term = (beta_prod_t**0.5) * model_output
        third_term = alpha_quotient * ((1 - alpha_prod_t_prev) ** 0.5) * model_output
        return first_term + second_term - third_term

    def guided_noise(self, latent, t, uncond, cond, guidance_scale):
        dtype = self.pipe.unet.dtype
        noise_pred_uncond = self.unet(latent.to(dtype), t, uncond.to(dtype)).to(torch.float64)
        noise_pred_cond = self.unet(latent.to(dtype), t, cond.to(dtype)).to(torch.float64)
        return noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)

    @torch.no_grad()
    def coupled(self, pair, prompt: str, guidance_scale: float, strength: float, mix_weight: float,
                reverse: bool):
        latent_pair = [p.to(torch.float64).clone() for p in pair]
        uncond, cond = self.embed([""]), self.embed([prompt])
        t_limit = self.num_steps - int(self.num_steps * strength)
        timesteps = self.timesteps[t_limit:]
        if reverse:
            timesteps = timesteps.flip(0)
        for i, t in enumerate(timesteps):
            if reverse:  # reverse mixing layer
                new_latents = [latent.clone() for latent in latent_pair]
                new_latents[1] = (new_latents[1].clone() - (1 - mix_weight) * new_latents[0].clone()) / mix_weight
                new_latents[0] = (new_latents[0].clone() - (1 - mix_weight) * new_latents[1].clone()) / mix_weight
                latent_pair = new_latents
            for latent_i in range(2):  # leapfrog_steps=True
                if reverse:
                    orig_i = len(timesteps) - (i + 1)
                    offset = (orig_i + 1) % 2
                else:
                    offset = i % 2
                latent_i = (latent_i + offset) % 2
                latent_j = (latent_i + 1) % 2
                noise_pred = self.guided_noise(latent_pair[latent_j], t, uncond, cond, guidance_scale)
                step = self.reverse_step if reverse else self.forward_step
                latent_base = latent_pair[latent_i]
                latent_pair[latent_i] = step(noise_pred, t, latent_base).to(latent_base.dtype)
            if not reverse:  # mixing layer (contraction)
                new_latents = [latent.clone() for latent in latent_pair]
                new_latents[0] = (mix_weight * new_latents[0] + (1 - mix_weight) * new_latents[1]).clone()
                new_latents[1] = ((1 - mix_weight) * new_latents[0] + mix_weight * new_latents[1]).clone()
                latent_pair = new_latents
        return tuple(latent_pair)

    def invert(self, x0, prompt: str, guidance_scale: float = 7.0, strength: float = 1.0, mix_weight: float = 0.93):
        """`reverse=True` from the pair (x0, x0): the float64 pair at timesteps[t_limit]."""
        return self.coupled((x0, x0), prompt, guidance_scale, strength, mix_weight, reverse=True)

    def sample(self, pair, prompt: str, guidance_scale: float = 7.0, strength: float = 1.0, mix_weight: float = 0.93):
        """`fixed_starting_latent=pair`: the float64 pair (x0, y0); the authors decode x0 ([0])."""
        return self.coupled(pair, prompt, guidance_scale, strength, mix_weight, reverse=False)


def edict_invert(pipe, x0, prompt: str, num_steps: int = 50, guidance_scale: float = 7.0, strength: float = 1.0,
                 mix_weight: float = 0.93, authors_schedule: bool = False):
    """(x_T, y_T), float64. Reconstruction defaults (w 7, strength 1); EDICT_editing: w 3, strength 0.8."""
    return ReferenceEDICT(pipe, num_steps, authors_schedule).invert(x0, prompt, guidance_scale, strength, mix_weight)


def edict_sample(pipe, pair, prompt: str, num_steps: int = 50, guidance_scale: float = 7.0, strength: float = 1.0,
                 mix_weight: float = 0.93, authors_schedule: bool = False):
    """(x0, y0), float64."""
    return ReferenceEDICT(pipe, num_steps, authors_schedule).sample(pair, prompt, guidance_scale, strength, mix_weight)


if __name__ == "__main__":
    from conftest import build_independent_pipeline

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    pipe = build_independent_pipeline()
    torch.manual_seed(0)
    x0 = _Parts(pipe).image2latent(torch.rand(1, 3, 16, 16) * 2 - 1)
    T, prompt = 10, "a photo of a cat"

    # DDPM: the same prompt and w through every map gives x0 back; the zeroed last map does not.
    xts, zs = ddpm_invert(pipe, x0, prompt, T, 1.0, torch.Generator().manual_seed(0))
    noise = ReferenceDDPMInversion(pipe, T).draw_noise(x0, torch.Generator().manual_seed(0))
    assert torch.equal(ddpm_invert(pipe, x0, prompt, T, 1.0, noise=noise)[0], xts)
    for skip in (0, 3):
        err = rel(ddpm_sample(pipe, xts[skip], zs, [prompt], 1.0, skip), x0)
        print(f"DDPM round trip, skip {skip}: {err:.2e}")
        assert err < 1e-5
    _, zs0 = ddpm_invert(pipe, x0, prompt, T, 1.0, torch.Generator().manual_seed(0), keep_last_map=False)
    print(f"DDPM, last map zeroed: {rel(ddpm_sample(pipe, xts[0], zs0, [prompt], 1.0), x0):.2e}")
    edit = ddpm_sample(pipe, xts[2], zs, [prompt, "a photo of a dog"], [1.0, 7.5], 2)
    # (a batch of two rounds the UNet unlike a batch of one: 2e-5 here, on a small x0)
    print(f"DDPM edit batch, source row: {rel(edit[:1], x0):.2e}")
    assert edit.shape == (2, *x0.shape[1:]) and rel(edit[:1], x0) < 1e-4

    # ProxNPI: the source row's delta is 0, so with recon_t 1000 and recon_lr 1 it is pulled onto
    # the inversion's latents at every step and ends on x_stars[0] = x0.
    x_stars, null = npi_invert(pipe, x0, prompt, T)
    out = proxnpi_sample(pipe, x_stars[-1], [prompt, "a photo of a dog"], null, T, x_stars=x_stars, recon_t=1000)
    print(f"ProxNPI source row vs x0 (recon_t 1000): {rel(out[:1], x0):.2e}; target moved {rel(out[1:], x0):.2e}")
    assert rel(out[:1], x0) < 1e-6 and torch.isfinite(out).all()
    out = proxnpi_sample(pipe, x_stars[-1], [prompt, "a photo of a dog"], null, T, prox="l1", inversion_guidance=False)
    assert torch.isfinite(out).all()

    # EDICT: float64 round trips, full strength and 0.8, both schedules.
    for authors in (False, True):
        for strength, w in ((1.0, 7.0), (0.8, 3.0)):
            pair = edict_invert(pipe, x0, prompt, T, w, strength, authors_schedule=authors)
            x, y = edict_sample(pipe, pair, prompt, T, w, strength, authors_schedule=authors)
            err = max(rel(x, x0), rel(y, x0))
            print(f"EDICT round trip (authors' schedule {authors}, strength {strength}, w {w}): {err:.2e}")
            assert x.dtype == torch.float64 and err < 1e-10
    print("ok")
