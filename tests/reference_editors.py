"""Plain, one-image-at-a-time oracles of three image editors, written after their authors' code.

PnPInversion (cure-lab/PnPInversion) sets the benchmark's settings, so its copies are followed; the
originals (TencentARC/MasaCtrl, MichalGeyer/pnp-diffusers, pix2pixzero/pix2pix-zero) differ only
where noted.

* MasaCtrl (`masactrl_sample`): `MasaCtrlPipeline.__call__` and `.step` in PnPInversion
  `models/masactrl/diffuser_utils.py` (TencentARC's `masactrl/diffuser_utils.py` plus the
  `noise_loss_list` of Direct Inversion), `MutualSelfAttentionControl` (`models/masactrl/masactrl.py`)
  over `AttentionBase`, registered as `regiter_attention_editor_diffusers` does
  (`models/masactrl/masactrl_utils.py`), settings from `run_editing_masactrl.py` (S = 4, L = 10,
  prompts `["", target]`, w 7.5).
* Plug-and-Play (`pnp_invert`, `pnp_reconstruct`, `pnp_sample`): PnPInversion `run_editing_pnp.py`:
  `Preprocess.ddim_inversion`, `.ddim_sample`, `.extract_latents`; `PNP.run_pnp`, `.init_pnp`,
  `.sample_loop`, `.denoise_step`; `register_time`, `register_attention_control_efficient`,
  `register_conv_control_efficient` (pnp-diffusers' `pnp.py` / `pnp_utils.py` / `preprocess.py`).
* Pix2Pix-Zero's inversion (`p2p_zero_invert`): PnPInversion `models/pix2pix_zero/ddim_inv.py`
  (`DDIMInversion.__call__`, `auto_corr_loss`, `kl_divergence`) with `models/pix2pix_zero/scheduler.py`
  (`DDIMInverseScheduler.step(reverse=True)`), as `run_editing_pix2pix_zero.py` calls it (the caption,
  guidance 1, the regularisation's defaults); its shifts from Python's global `random` (the caller
  seeds it), from a given latent (theirs: one draw of the VAE's posterior).
* Pix2Pix-Zero (`p2p_zero_edit`): PnPInversion `run_editing_pix2pix_zero.py`
  (`load_sentence_embeddings`, `edit_image_*_pix2pix_zero`) and `models/pix2pix_zero/edit_pipeline.py`
  (`EditingPipeline.__call__`), `cross_attention.py` (`MyCrossAttnProcessor`, `prep_unet`),
  `base_pipeline.py` (`_encode_prompt`, `prepare_latents`).

Nothing here comes from `nti_lightning` (only `build_sd15_shaped_pipeline`, a model factory, borrows its
VOCAB_SIZE and `assemble_pipeline`). Every function takes a diffusers `StableDiffusionPipeline` with
fp32 weights, runs any number of steps T and returns latents. Every module or processor patched is
restored before the function returns (the pipeline is left as it was, `requires_grad` and `.grad`
of the UNet's parameters included).

Schedulers (T steps; `stride = num_train_timesteps // T`):

* MasaCtrl: `DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
  set_alpha_to_one=False)` (the authors' settings), timesteps from `set_timesteps(T)`, stepped by
  the pipeline's own `step` (eta 0; alphas_cumprod[t - stride], final_alpha_cumprod when
  `t - stride > 0` fails: strict `>`, which with set_alpha_to_one=False gives the same value at 0).
  NOTE: `MasaCtrlEditor` builds `DDIMScheduler(beta_start=0.00085, beta_end=0.012,
  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)` without
  `steps_offset`, i.e. 0: its timesteps are 980 ... 0 at T = 50, not SD's 981 ... 1. The oracle keeps
  the pipe's `steps_offset`; give it a pipe whose scheduler config has `steps_offset=0` for the
  authors' grid.
* PnP: `DDIMScheduler.from_config(pipe.scheduler.config)` unchanged (the authors'
  `DDIMScheduler.from_pretrained(model_key, subfolder="scheduler")`, SD 1.5: steps_offset 1,
  clip_sample False, set_alpha_to_one False), `set_timesteps(T)`, stepped by diffusers'
  `DDIMScheduler.step` in the edit; the inversion and reconstruction step by hand as the script.
* Pix2Pix-Zero: `DDIMScheduler.from_config(pipe.scheduler.config)` unchanged, as the script
  (`DDIMScheduler.from_config(edit_pipe.scheduler.config)`; SD 1.4's config has clip_sample False,
  set_alpha_to_one False, steps_offset 1, and so has the test pipelines' config); whatever the pipe's
  config says (clip_sample included) is used. `scheduler.step(..., eta=0.0, generator=None)`.

Adaptations to the installed diffusers (0.42):

* Pix2Pix-Zero matches modules by the class name `CrossAttention` (its old diffusers); here
  `Attention` (`diffusers.models.attention_processor`). MasaCtrl's registration already matches
  `Attention`; PnP addresses modules by position.
* Replacement `Attention.forward`s (MasaCtrl's `ca_forward`, PnP's `sa_forward`) take the installed
  signature `forward(hidden_states, encoder_hidden_states=None, attention_mask=None,
  **cross_attention_kwargs)` (the kwargs, empty in these pipelines, are ignored). They use
  `to_out[0]` (no dropout module, as the authors) and, as the authors, ignore `residual_connection`,
  `rescale_output_factor`, `group_norm` and `spatial_norm` (all inactive in SD's UNet).
* Pix2Pix-Zero's processor calls `attn.prepare_attention_mask(mask, sequence_length, batch_size)`
  (the installed signature; the mask is None here) and `attn.get_attention_scores` (baddbmm with
  `scale`, upcasts as configured), then `to_out[0]`, `to_out[1]` as the authors.
* PnP's `conv_forward` replaces `ResnetBlock2D.forward(input_tensor, temb, *args, **kwargs)`; its body
  is the authors' (equal to the installed one for SD's `time_embedding_norm="default"` and
  `skip_time_act=False`), with the injection after `conv2`.
* einops is not installed: its `rearrange`s are written as reshape / permute.
* `register_time` sets an attribute `t` on fixed modules; here the patched forwards read the current
  `t` from a closure instead (only patched modules read `t`, so this is the same).
* Prompts are tokenized padded to `model_max_length` with truncation everywhere (the authors
  truncate some calls and not others; for prompts under 77 tokens this is the same).
* Everything runs in the pipe's dtype (the authors: fp16 UNet under fp32 autocast for PnP, fp32 for
  the others).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


# ----------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _embed(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP token embeddings [len(prompts), 77, D], padded to 77 (every script's text encoding)."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def _heads_to_batch(t: torch.Tensor, h: int) -> torch.Tensor:
    """rearrange(t, 'b n (h d) -> (b h) n d', h=h)."""
    b, n, hd = t.shape
    return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)


def _batch_to_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """rearrange(t, '(b h) n d -> b n (h d)', h=h)."""
    bh, n, d = t.shape
    return t.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)


class _Patches:
    """Instance-level `forward` replacements, undone in reverse order by `restore()`."""

    def __init__(self):
        self._saved: list[tuple[torch.nn.Module, bool, object]] = []

    def set_forward(self, module: torch.nn.Module, forward) -> None:
        had = "forward" in module.__dict__
        self._saved.append((module, had, module.__dict__.get("forward")))
        module.forward = forward

    def restore(self) -> None:
        for module, had, old in reversed(self._saved):
            if had:
                module.forward = old
            else:
                del module.forward
        self._saved.clear()


# ----------------------------------------------------------------------------------------------------
# MasaCtrl (Cao et al.)
# ----------------------------------------------------------------------------------------------------
class _MutualSelfAttentionControl:
    """`MutualSelfAttentionControl` over `AttentionBase` (masactrl.py / masactrl_utils.py).

    * `__call__` (AttentionBase): the editor's layer counter `cur_att_layer` advances on EVERY
      attention call of the UNet (self and cross, in call order); after `num_att_layers` calls (the
      number of `Attention` modules registered) it goes back to 0 and `cur_step` += 1, so one UNet
      call is one step. For a self-attention (`attn1`, call 2k of a transformer block, its `attn2`
      being call 2k + 1), `cur_att_layer // 2` = k is the self-attention layer index.
    * `forward`: when `is_cross`, or `cur_step` not in `step_idx`, or `cur_att_layer // 2` not in
      `layer_idx`: plain attention from the probabilities `attn`. Otherwise q, k, v (rows `(b h)`) are
      halved (`chunk(2)`: the uncond rows, then the cond rows) and every row's queries of a half attend
      to the keys/values of that half's FIRST row (`k[:num_heads]`, the source image), the softmax
      being recomputed (`attn_batch`) from `q k^T * scale`.
    """

    def __init__(self, step_idx: Sequence[int], layer_idx: Sequence[int]):
        self.cur_step = 0
        self.num_att_layers = -1
        self.cur_att_layer = 0
        self.step_idx = list(step_idx)
        self.layer_idx = list(layer_idx)

    def __call__(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs):
        out = self.forward(q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
        return out

    @staticmethod
    def base_forward(attn, v, num_heads):
        """AttentionBase.forward."""
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        return _batch_to_heads(out, num_heads)

    @staticmethod
    def attn_batch(q, k, v, num_heads, scale):
        b = q.shape[0] // num_heads
        n, d = q.shape[1], q.shape[2]
        # rearrange "(b h) n d -> h (b n) d"
        q = q.reshape(b, num_heads, n, d).permute(1, 0, 2, 3).reshape(num_heads, b * n, d)
        kb = k.shape[0] // num_heads
        k = k.reshape(kb, num_heads, -1, d).permute(1, 0, 2, 3).reshape(num_heads, -1, d)
        v = v.reshape(kb, num_heads, -1, d).permute(1, 0, 2, 3).reshape(num_heads, -1, d)
        sim = torch.einsum("h i d, h j d -> h i j", q, k) * scale
        attn = sim.softmax(-1)
        out = torch.einsum("h i j, h j d -> h i d", attn, v)
        # rearrange "h (b n) d -> b n (h d)"
        return out.reshape(num_heads, b, n, d).permute(1, 2, 0, 3).reshape(b, n, num_heads * d)

    def forward(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs):
        if is_cross or self.cur_step not in self.step_idx or self.cur_att_layer // 2 not in self.layer_idx:
            return self.base_forward(attn, v, num_heads)
        qu, qc = q.chunk(2)
        ku, kc = k.chunk(2)
        vu, vc = v.chunk(2)
        out_u = self.attn_batch(qu, ku[:num_heads], vu[:num_heads], num_heads, kwargs.get("scale"))
        out_c = self.attn_batch(qc, kc[:num_heads], vc[:num_heads], num_heads, kwargs.get("scale"))
        return torch.cat([out_u, out_c], dim=0)


def _masactrl_ca_forward(module, editor, place_in_unet):
    """`regiter_attention_editor_diffusers`' `ca_forward` (installed signature)."""

    def forward(x, encoder_hidden_states=None, attention_mask=None, context=None, mask=None, **cross_attention_kwargs):
        if encoder_hidden_states is not None:
            context = encoder_hidden_states
        if attention_mask is not None:
            mask = attention_mask
        to_out = module.to_out
        if isinstance(to_out, torch.nn.ModuleList):
            to_out = module.to_out[0]
        h = module.heads
        q = module.to_q(x)
        is_cross = context is not None
        context = context if is_cross else x
        k = module.to_k(context)
        v = module.to_v(context)
        q, k, v = (_heads_to_batch(t, h) for t in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * module.scale
        if mask is not None:  # SD passes no attention mask (the authors' masking code is not reproduced)
            raise NotImplementedError("attention masks")
        attn = sim.softmax(dim=-1)
        out = editor(q, k, v, sim, attn, is_cross, place_in_unet, module.heads, scale=module.scale)
        return to_out(out)

    return forward


def _register_masactrl(unet, editor, patches: _Patches) -> None:
    """`regiter_attention_editor_diffusers`: patch every `Attention` under down / mid / up blocks
    (searched depth-first in `named_children` order), count them into `editor.num_att_layers`."""

    def register_editor(net, count, place_in_unet):
        for _name, subnet in net.named_children():
            if net.__class__.__name__ == "Attention":  # spatial Transformer layer (the authors' check)
                patches.set_forward(net, _masactrl_ca_forward(net, editor, place_in_unet))
                return count + 1
            elif hasattr(net, "children"):
                count = register_editor(subnet, count, place_in_unet)
        return count

    cross_att_count = 0
    for net_name, net in unet.named_children():
        if "down" in net_name:
            cross_att_count += register_editor(net, 0, "down")
        elif "mid" in net_name:
            cross_att_count += register_editor(net, 0, "mid")
        elif "up" in net_name:
            cross_att_count += register_editor(net, 0, "up")
    editor.num_att_layers = cross_att_count


@torch.no_grad()
def masactrl_sample(pipe: StableDiffusionPipeline, x_T: torch.Tensor, prompts: Sequence[str], num_steps: int = 50,
                    guidance_scale: float = 7.5, step_idx: Sequence[int] | None = None,
                    layer_idx: Sequence[int] | None = None, unconditioning: Sequence[torch.Tensor] | None = None,
                    noise_loss_list: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """`MasaCtrlPipeline.__call__(prompts, latents=x_T.expand(B), guidance_scale, ...)` under a fresh
    `MutualSelfAttentionControl(step_idx, layer_idx)`. Returns the [B, 4, h, w] latents at t = 0.

    * One UNet call per step on `cat([latents] * 2)` with `cat([uncond] * B + conds)` when
      guidance_scale > 1 (no CFG and a batch of B otherwise: then the editor's `chunk(2)` halves the
      prompt rows themselves, as in the authors' code); uncond "" for every row.
    * `unconditioning` (T tensors [1, 77, D]): step i's uncond rows are `unconditioning[i]` (the
      pipeline's per-step null embeddings).
    * `noise_loss_list` (T tensors): after step i, `latents[:1] += noise_loss_list[i][:1]` (Direct
      Inversion keeps the source row on the inversion trajectory).
    """
    unet = pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(num_steps)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    step_idx = list(range(4, num_steps)) if step_idx is None else list(step_idx)
    layer_idx = list(range(10, 16)) if layer_idx is None else list(layer_idx)

    def step(model_output, timestep, x):  # MasaCtrlPipeline.step
        prev_timestep = timestep - stride
        alpha_prod_t = scheduler.alphas_cumprod[timestep]
        alpha_prod_t_prev = (scheduler.alphas_cumprod[prev_timestep] if prev_timestep > 0
                             else scheduler.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        pred_x0 = (x - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_dir = (1 - alpha_prod_t_prev) ** 0.5 * model_output
        x_prev = alpha_prod_t_prev**0.5 * pred_x0 + pred_dir
        return x_prev, pred_x0

    batch_size = len(prompts)
    text_embeddings = _embed(pipe, prompts)
    latents = x_T.reshape(1, *x_T.shape[-3:]).expand(batch_size, -1, -1, -1)
    if guidance_scale > 1.0:
        unconditional_embeddings = _embed(pipe, [""] * batch_size)
        text_embeddings = torch.cat([unconditional_embeddings, text_embeddings], dim=0)

    editor = _MutualSelfAttentionControl(step_idx, layer_idx)
    patches = _Patches()
    try:
        _register_masactrl(unet, editor, patches)
        for i, t in enumerate(scheduler.timesteps):
            model_inputs = torch.cat([latents] * 2) if guidance_scale > 1.0 else latents
            if unconditioning is not None and isinstance(unconditioning, (list, tuple)):
                _, text_embeddings = text_embeddings.chunk(2)
                text_embeddings = torch.cat([unconditioning[i].expand(*text_embeddings.shape), text_embeddings])
            noise_pred = unet(model_inputs, t, encoder_hidden_states=text_embeddings).sample
            if guidance_scale > 1.0:
                noise_pred_uncon, noise_pred_con = noise_pred.chunk(2, dim=0)
                noise_pred = noise_pred_uncon + guidance_scale * (noise_pred_con - noise_pred_uncon)
            latents, _pred_x0 = step(noise_pred, t, latents)
            if noise_loss_list is not None:
                latents = torch.concat((latents[:1] + noise_loss_list[i][:1], latents[1:]))
    finally:
        patches.restore()
    return latents


# ----------------------------------------------------------------------------------------------------
# Plug-and-Play (Tumanyan et al.)
# ----------------------------------------------------------------------------------------------------
def _pnp_scheduler(pipe: StableDiffusionPipeline, num_steps: int) -> DDIMScheduler:
    """`DDIMScheduler.from_pretrained(model_key, subfolder="scheduler")` + `set_timesteps(T)`."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def pnp_invert(pipe: StableDiffusionPipeline, z0: torch.Tensor, prompt: str,
               num_steps: int = 50) -> list[torch.Tensor]:
    """`Preprocess.ddim_inversion(cond, latent)` with `cond` the prompt's embedding alone (no CFG):
    `inverted_x`, T + 1 latents, z0 first, x at timesteps[T-1] ... timesteps[0] after it.
    Step i (t ascending): eps = unet(x, t_i); the previous alpha is alphas_cumprod[t_{i-1}]
    (final_alpha_cumprod for i = 0)."""
    scheduler = _pnp_scheduler(pipe, num_steps)
    cond = _embed(pipe, [prompt])  # get_text_embeds(prompt, "")[1].unsqueeze(0)
    latent = z0
    latent_list = [latent]
    timesteps = scheduler.timesteps.flip(0)  # reversed(self.scheduler.timesteps)
    for i, t in enumerate(timesteps):
        cond_batch = cond.repeat(latent.shape[0], 1, 1)
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = scheduler.alphas_cumprod[timesteps[i - 1]] if i > 0 else scheduler.final_alpha_cumprod
        mu = alpha_prod_t**0.5
        mu_prev = alpha_prod_t_prev**0.5
        sigma = (1 - alpha_prod_t) ** 0.5
        sigma_prev = (1 - alpha_prod_t_prev) ** 0.5
        eps = pipe.unet(latent, t, encoder_hidden_states=cond_batch).sample
        pred_x0 = (latent - sigma_prev * eps) / mu_prev
        latent = mu * pred_x0 + sigma * eps
        latent_list.append(latent)
    return latent_list


@torch.no_grad()
def pnp_reconstruct(pipe: StableDiffusionPipeline, x_T: torch.Tensor, prompt: str,
                    num_steps: int = 50) -> list[torch.Tensor]:
    """`Preprocess.ddim_sample(x_T, cond)` then `.reverse()` (`extract_latents`' `latent_reconstruction`):
    T latents, the final (t = 0) one FIRST, the latent after the first step (at timesteps[1]) LAST;
    x_T itself is not in the list."""
    scheduler = _pnp_scheduler(pipe, num_steps)
    cond = _embed(pipe, [prompt])
    timesteps = scheduler.timesteps
    x = x_T
    latent_list = []
    for i, t in enumerate(timesteps):
        cond_batch = cond.repeat(x.shape[0], 1, 1)
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = (scheduler.alphas_cumprod[timesteps[i + 1]] if i < len(timesteps) - 1
                             else scheduler.final_alpha_cumprod)
        mu = alpha_prod_t**0.5
        sigma = (1 - alpha_prod_t) ** 0.5
        mu_prev = alpha_prod_t_prev**0.5
        sigma_prev = (1 - alpha_prod_t_prev) ** 0.5
        eps = pipe.unet(x, t, encoder_hidden_states=cond_batch).sample
        pred_x0 = (x - sigma * eps) / mu
        x = mu_prev * pred_x0 + sigma_prev * eps
        latent_list.append(x)
    latent_list.reverse()
    return latent_list


def _pnp_sa_forward(module, state):
    """`register_attention_control_efficient`'s `sa_forward` (installed signature); `state["t"]` is
    what `register_time` would have set on the module."""
    to_out = module.to_out
    if type(to_out) is torch.nn.modules.container.ModuleList:
        to_out = module.to_out[0]

    def forward(x, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
        is_cross = encoder_hidden_states is not None
        encoder_hidden_states = encoder_hidden_states if is_cross else x
        schedule = state["qk_schedule"]
        t = state["t"]
        if not is_cross and schedule is not None and (t in schedule or t == 1000):
            q = module.to_q(x)
            k = module.to_k(encoder_hidden_states)
            source_batch_size = int(q.shape[0] // 3)
            # inject unconditional
            q[source_batch_size:2 * source_batch_size] = q[:source_batch_size]
            k[source_batch_size:2 * source_batch_size] = k[:source_batch_size]
            # inject conditional
            q[2 * source_batch_size:] = q[:source_batch_size]
            k[2 * source_batch_size:] = k[:source_batch_size]
            q = module.head_to_batch_dim(q)
            k = module.head_to_batch_dim(k)
        else:
            q = module.to_q(x)
            k = module.to_k(encoder_hidden_states)
            q = module.head_to_batch_dim(q)
            k = module.head_to_batch_dim(k)
        v = module.to_v(encoder_hidden_states)
        v = module.head_to_batch_dim(v)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * module.scale
        if attention_mask is not None:  # SD passes no attention mask (the authors' masking code is not reproduced)
            raise NotImplementedError("attention masks")
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        out = module.batch_to_head_dim(out)
        return to_out(out)

    return forward


def _pnp_conv_forward(module, state):
    """`register_conv_control_efficient`'s `conv_forward` (installed `ResnetBlock2D` signature)."""

    def forward(input_tensor, temb, *args, **kwargs):
        hidden_states = input_tensor
        hidden_states = module.norm1(hidden_states)
        hidden_states = module.nonlinearity(hidden_states)
        if module.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = module.upsample(input_tensor)
            hidden_states = module.upsample(hidden_states)
        elif module.downsample is not None:
            input_tensor = module.downsample(input_tensor)
            hidden_states = module.downsample(hidden_states)
        hidden_states = module.conv1(hidden_states)
        if temb is not None:
            temb = module.time_emb_proj(module.nonlinearity(temb))[:, :, None, None]
        if temb is not None and module.time_embedding_norm == "default":
            hidden_states = hidden_states + temb
        hidden_states = module.norm2(hidden_states)
        if temb is not None and module.time_embedding_norm == "scale_shift":
            scale, shift = torch.chunk(temb, 2, dim=1)
            hidden_states = hidden_states * (1 + scale) + shift
        hidden_states = module.nonlinearity(hidden_states)
        hidden_states = module.dropout(hidden_states)
        hidden_states = module.conv2(hidden_states)
        schedule = state["conv_schedule"]
        t = state["t"]
        if schedule is not None and (t in schedule or t == 1000):
            source_batch_size = int(hidden_states.shape[0] // 3)
            # inject unconditional
            hidden_states[source_batch_size:2 * source_batch_size] = hidden_states[:source_batch_size]
            # inject conditional
            hidden_states[2 * source_batch_size:] = hidden_states[:source_batch_size]
        if module.conv_shortcut is not None:
            input_tensor = module.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / module.output_scale_factor

    return forward


@torch.no_grad()
def pnp_sample(pipe: StableDiffusionPipeline, noisy_latent: Sequence[torch.Tensor], target_prompt: str,
               num_steps: int = 50, guidance_scale: float = 7.5, pnp_f_t: float = 0.8, pnp_attn_t: float = 0.5,
               negative_prompt: str = "ugly, blurry, black, low res, unrealistic", source_prompt: str = "",
               feature_block: tuple[int, int] = (1, 1),
               attention_blocks: dict[int, Sequence[int]] | None = None) -> torch.Tensor:
    """`PNP.run_pnp(image, noisy_latent, target_prompt, guidance_scale, pnp_f_t, pnp_attn_t)`: the target's
    [1, 4, h, w] latent at t = 0.

    * `pnp_f_t = int(T * pnp_f_t)`, `pnp_attn_t = int(T * pnp_attn_t)` (Python's `int`, truncation);
      feature injection at `timesteps[:pnp_f_t]`, q/k injection at `timesteps[:pnp_attn_t]` (the FIRST,
      noisiest steps; an injection is on when the step's `t.item()` is in that tensor).
    * Features: the output of `conv2` of `up_blocks[fb[0]].resnets[fb[1]]` (before the shortcut sum)
      of the uncond and cond rows is overwritten by the source row's. Self-attention q and k of
      `up_blocks[i].attentions[j].transformer_blocks[0].attn1` for i, j in `attention_blocks` (v
      untouched). Those attn1 modules always run the authors' einsum attention (injection or not).
    * Step i: UNet on `cat([noisy_latent[-1 - i], x, x])` with `cat([emb(source_prompt) (the authors'
      `get_text_embeds("", "").chunk(2)[0]`), emb(negative_prompt), emb(target_prompt)])`; CFG from the
      last two; `x = scheduler.step(eps, t, x).prev_sample`. x starts at `noisy_latent[-1]`.
    * As the script passes it: `latent_reconstruction` (`pnp_reconstruct`: T latents, t = 0 first) for
      the DDIM row, so x STARTS from the reconstruction after its first step (at timesteps[1]) and runs
      all T steps from timesteps[0], step i's source branch seeing the reconstruction's latent at
      timesteps[i + 1] (the final one, t = 0, at the last step): one step off. `inverted_x`
      (`pnp_invert`: T + 1 latents, z0 first) for the Direct row: x starts at x_T and step i's source
      branch sees the inversion's latent at timesteps[i].
    """
    if attention_blocks is None:
        attention_blocks = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}
    unet = pipe.unet
    scheduler = _pnp_scheduler(pipe, num_steps)
    n_timesteps = num_steps
    text_embeds = torch.cat([_embed(pipe, [negative_prompt]), _embed(pipe, [target_prompt])])
    pnp_guidance_embeds = _embed(pipe, [source_prompt])

    pnp_f_t = int(n_timesteps * pnp_f_t)
    pnp_attn_t = int(n_timesteps * pnp_attn_t)
    # init_pnp
    state = {
        "t": None,
        "qk_schedule": scheduler.timesteps[:pnp_attn_t] if pnp_attn_t >= 0 else [],
        "conv_schedule": scheduler.timesteps[:pnp_f_t] if pnp_f_t >= 0 else [],
    }
    patches = _Patches()
    try:
        for res, blocks in attention_blocks.items():
            for block in blocks:
                module = unet.up_blocks[res].attentions[block].transformer_blocks[0].attn1
                patches.set_forward(module, _pnp_sa_forward(module, state))
        conv_module = unet.up_blocks[feature_block[0]].resnets[feature_block[1]]
        patches.set_forward(conv_module, _pnp_conv_forward(conv_module, state))

        x = noisy_latent[-1]  # self.eps
        for i, t in enumerate(scheduler.timesteps):  # sample_loop
            # denoise_step(x, t, guidance_scale, noisy_latent[-1 - i])
            latent_model_input = torch.cat([noisy_latent[-1 - i]] + [x] * 2)
            state["t"] = t.item()  # register_time
            text_embed_input = torch.cat([pnp_guidance_embeds, text_embeds], dim=0)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embed_input).sample
            _, noise_pred_uncond, noise_pred_cond = noise_pred.chunk(3)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            x = scheduler.step(noise_pred, t, x).prev_sample
    finally:
        patches.restore()
    return x


# ----------------------------------------------------------------------------------------------------
# Pix2Pix-Zero (Parmar et al.)
# ----------------------------------------------------------------------------------------------------
class _MyCrossAttnProcessor:
    """cross_attention.py `MyCrossAttnProcessor`: plain attention that keeps `attn.attn_probs`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        encoder_hidden_states = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        attn.attn_probs = attention_probs  # new bookkeeping to save the attn probs
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        return hidden_states


def _sentence_embedding(pipe, sentences: Sequence[str]) -> torch.Tensor:
    """`load_sentence_embeddings`: the mean over the sentences of their [1, 77, D] embeddings."""
    return torch.concat([_embed(pipe, [s]) for s in sentences], dim=0).mean(dim=0).unsqueeze(0)


def p2p_zero_edit(pipe: StableDiffusionPipeline, x_in: torch.Tensor, caption: str, source_prompt: str,
                  target_prompt: str, num_steps: int = 50, guidance_scale: float = 7.5, guidance_amount: float = 0.1,
                  latent_list: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`EditingPipeline.__call__(caption, x_in=x_in, edit_dir=..., guidance_amount, guidance_scale,
    negative_prompt=caption, latent_list)`: (reconstruction, edit), [1, 4, h, w] latents at t = 0.

    * `edit_dir = (emb(target).mean(0) - emb(source).mean(0)).unsqueeze(0)`: [1, 77, D], every token.
    * Embeddings `[emb(caption) (the negative prompt), emb(caption)]`; the edit pass adds `edit_dir`
      to row 1 only (`prompt_embeds_edit[1:2] += edit_dir`).
    * `prep_unet`: every `Attention` (self and cross) gets `MyCrossAttnProcessor`; parameters whose
      name holds 'attn2' require grad, the others not (so `backward` also fills their `.grad`).
    * Reference pass (no grad) from `x_in * init_noise_sigma`: after each UNet call the probabilities
      of every module named '...attn2' are stored under `t.item()`; CFG, `scheduler.step`. With
      `latent_list` (T + 1 latents, z0 first): `noise_loss_list.append(latent_list[-2 - i] - latents)`
      and `latents += noise_loss_list[-1]` (so the reference pass lands on the inversion's latents).
    * Edit pass from the same start: `x_in = cat([latents] * 2).detach().clone()` requiring grad,
      `SGD([x_in], lr=guidance_amount)`; UNet with the edited embeddings; loss = sum over attn2 modules
      of `((curr - ref) ** 2).sum((1, 2)).mean(0)` (mean over the 2 x heads rows of uncond AND cond);
      backward, `opt.step()` (both rows move, each by its own gradient); the noise is recomputed on the
      updated `x_in` (the uncond branch sees row 0, the cond branch row 1); `latents =
      x_in.detach().chunk(2)[0]`: the UNCOND row's updated latent is the one stepped; CFG,
      `scheduler.step`, then `+ noise_loss_list[i]` with `latent_list`.
    """
    unet = pipe.unet
    device = x_in.device
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    extra_step_kwargs = {"eta": 0.0, "generator": None}

    mean_emb_src = _sentence_embedding(pipe, [source_prompt])
    mean_emb_tar = _sentence_embedding(pipe, [target_prompt])
    edit_dir = (mean_emb_tar.mean(0) - mean_emb_src.mean(0)).unsqueeze(0)

    do_classifier_free_guidance = guidance_scale > 1.0
    prompt_embeds = _embed(pipe, [caption])
    if do_classifier_free_guidance:
        prompt_embeds = torch.cat([_embed(pipe, [caption]), prompt_embeds])

    # prep_unet, undone in `finally`
    saved_params = [(p, p.requires_grad, p.grad) for _, p in unet.named_parameters()]
    saved_processors = unet.attn_processors
    attn_modules = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    try:
        for name, params in unet.named_parameters():
            params.requires_grad = "attn2" in name
        for module in attn_modules:
            module.set_processor(_MyCrossAttnProcessor())
        attn2 = [(name, module) for name, module in unet.named_modules()
                 if type(module).__name__ == "Attention" and "attn2" in name]

        latents = x_in.detach().to(dtype=unet.dtype) * scheduler.init_noise_sigma  # prepare_latents
        latents_init = latents.clone()

        d_ref_t2attn: dict[int, dict[str, torch.Tensor]] = {}
        noise_loss_list = []
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample
                d_ref_t2attn[t.item()] = {name: module.attn_probs.detach().cpu() for name, module in attn2}
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
                if latent_list is not None:
                    noise_loss_list.append(latent_list[-2 - i] - latents)
                    latents = latents + noise_loss_list[-1]
        reconstruction = latents.detach()

        prompt_embeds_edit = prompt_embeds.clone()
        prompt_embeds_edit[1:2] += edit_dir  # idx 0 is the negative prompt
        latents = latents_init
        for i, t in enumerate(timesteps):
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            x_var = latent_model_input.detach().clone()
            x_var.requires_grad = True
            opt = torch.optim.SGD([x_var], lr=guidance_amount)
            with torch.enable_grad():
                noise_pred = unet(x_var, t, encoder_hidden_states=prompt_embeds_edit.detach()).sample
                loss = 0.0
                for name, module in attn2:
                    curr = module.attn_probs
                    ref = d_ref_t2attn[t.item()][name].detach().to(device)
                    loss += ((curr - ref) ** 2).sum((1, 2)).mean(0)
                loss.backward(retain_graph=False)
            opt.step()
            with torch.no_grad():  # recompute the noise
                noise_pred = unet(x_var.detach(), t, encoder_hidden_states=prompt_embeds_edit).sample
                latents = x_var.detach().chunk(2)[0]
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
                if latent_list is not None:
                    latents = latents + noise_loss_list[i]
        edit = latents.detach()
    finally:
        unet.set_attn_processor(saved_processors)
        for module in attn_modules:
            if "attn_probs" in module.__dict__:
                del module.attn_probs
        for p, requires_grad, grad in saved_params:
            p.requires_grad_(requires_grad)
            p.grad = grad
    return reconstruction, edit


# ----------------------------------------------------------------------------------------------------
# A small pipeline with SD 1.5's UNet layout
# ----------------------------------------------------------------------------------------------------
def build_sd15_shaped_pipeline(seed: int = 0, resolution: int = 64) -> StableDiffusionPipeline:
    """Random weights (seeded; the caller's random stream is left as it was), SD 1.5's UNet LAYOUT:
    3 x CrossAttnDownBlock2D + DownBlock2D, UpBlock2D + 3 x CrossAttnUpBlock2D, 2 layers per block
    (3 resnets / attentions per up block), so 16 self-attention layers in SD's order (6 down, 1 mid,
    9 up) and `up_blocks[1].resnets[1]` / `up_blocks[1..3].attentions[...]` as PnP addresses them; small
    channels (32, 32, 64, 64). A 4-level VAE (8x, as SD's: `resolution` px <-> `resolution // 8`
    latents), a 2-layer CLIP text encoder of width 32, CLIP's tokenizer, SD's DDIM scheduler config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # a model factory, not an editor: the package's tokenizer size and assembly are fine here
    from nti_lightning.models.tiny import assemble_pipeline
    from nti_lightning.models.tokenizer import VOCAB_SIZE

    text_width = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=text_width,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=resolution,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB_SIZE, hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            )
        )
    return assemble_pipeline(vae, unet, text_encoder)


# ----------------------------------------------------------------------------------------------------
# Pix2Pix-Zero's DDIM inversion with noise regularisation


def _auto_corr_loss(x, random_shift=True):  # DDIMInversion.auto_corr_loss
    B, C, H, W = x.shape
    assert B == 1
    x = x.squeeze(0)
    reg_loss = 0.0
    for ch_idx in range(x.shape[0]):
        noise = x[ch_idx][None, None, :, :]
        while True:
            if random_shift:
                roll_amount = random.randrange(noise.shape[2] // 2)
            else:
                roll_amount = 1
            reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=2)).mean() ** 2
            reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = torch.nn.functional.avg_pool2d(noise, kernel_size=2)
    return reg_loss


def _kl_divergence(x):  # DDIMInversion.kl_divergence
    _mu = x.mean()
    _var = x.var()
    return _var + _mu**2 - 1 - torch.log(_var + 1e-7)


def p2p_zero_invert(pipe: StableDiffusionPipeline, x0: torch.Tensor, caption: str, num_steps: int = 50,
                    lambda_ac: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 5,
                    num_ac_rolls: int = 5) -> list[torch.Tensor]:
    """`DDIMInversion.__call__(caption, guidance_scale=1, num_inversion_steps=T, img=...)`'s
    `latent_list` (T + 1 latents, x0 first) from the latent `x0` `[1, 4, h, w]`. The scheduler's
    inverse step (`DDIMInverseScheduler.step(reverse=True)`): `a_t = ā[t - 1]`, `a_prev = ā[t + Δ - 1]`
    (`ā[-1]` past 1000). ε-prediction only, as the authors'."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    train = scheduler.config.num_train_timesteps
    alphas = scheduler.alphas_cumprod
    embeddings = _embed(pipe, [caption])
    latents = x0.float()
    latent_list = [latents]
    for t in scheduler.timesteps.flip(0):
        with torch.no_grad():
            noise_pred = pipe.unet(latents, t, encoder_hidden_states=embeddings).sample
        e_t = noise_pred
        for _outer in range(num_reg_steps):
            if lambda_ac > 0:
                for _inner in range(num_ac_rolls):
                    _var = torch.autograd.Variable(e_t.detach().clone(), requires_grad=True)
                    l_ac = _auto_corr_loss(_var)
                    l_ac.backward()
                    _grad = _var.grad.detach() / num_ac_rolls
                    e_t = e_t - lambda_ac * _grad
            if lambda_kl > 0:
                _var = torch.autograd.Variable(e_t.detach().clone(), requires_grad=True)
                l_kld = _kl_divergence(_var)
                l_kld.backward()
                _grad = _var.grad.detach()
                e_t = e_t - lambda_kl * _grad
            e_t = e_t.detach()
        # DDIMInverseScheduler.step(..., reverse=True)
        timestep = int(t)
        prev_timestep = timestep + train // num_steps
        a_t = alphas[timestep - 1]
        a_prev = alphas[prev_timestep - 1] if prev_timestep <= train else alphas[-1]
        pred_x0 = (latents - (1 - a_t) ** 0.5 * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev).sqrt() * e_t
        latents = a_prev.sqrt() * pred_x0 + dir_xt
        latent_list.append(latents)
    return latent_list
