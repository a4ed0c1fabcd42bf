"""A plain, independent Prompt-to-Prompt implementation to check `nti_lightning.editing` against.

Written after the authors' code (google/prompt-to-prompt: `prompt-to-prompt_stable.ipynb`,
`null_text_w_ptp.ipynb`, `ptp_utils.py`, `seq_aligner.py`), keeping its structure: controllers
called as `controller(attn, is_cross, place_in_unet)` on `[batch * heads, queries, keys]` maps,
editing the conditional half in place, and counting attention layers to know the step. Adapted:

* an attention processor (`ReferenceAttnProcessor`) stands in for the patched `forward`;
* the sampling loop is the authors' `text2image_ldm_stable` of the null-text notebook, with
  diffusers' `DDIMScheduler.step` and the inversion's null embedding of each step;
* tokenizer, number of steps and device are arguments instead of notebook globals;
* `LocalBlend` reads all down/up cross-attention maps at the coarsest stored resolution, or at
  the `resolution` given (the authors' `down_cross[2:4] + up_cross[:3]` are exactly the 16x16 ones
  of SD 1.x);
* `get_replacement_mapper_` keeps the positions after the last swapped word aligned (`mapper[i, j]`;
  the authors write `mapper[j, j]` there, which only differs after a word with another token count).
"""

from __future__ import annotations

import abc
import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as nnf
from diffusers import DDIMScheduler

MAX_NUM_WORDS = 77


# ----------------------------------------------------------------------------------- seq_aligner
class ScoreParams:
    def __init__(self, gap, match, mismatch):
        self.gap = gap
        self.match = match
        self.mismatch = mismatch

    def mis_match_char(self, x, y):
        return self.match if x == y else self.mismatch


def get_matrix(size_x, size_y, gap):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(size_y) + 1) * gap
    matrix[1:, 0] = (np.arange(size_x) + 1) * gap
    return matrix


def get_traceback_matrix(size_x, size_y):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = 1
    matrix[1:, 0] = 2
    matrix[0, 0] = 4
    return matrix


def global_align(x, y, score):
    matrix = get_matrix(len(x), len(y), score.gap)
    trace_back = get_traceback_matrix(len(x), len(y))
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + score.gap
            up = matrix[i - 1, j] + score.gap
            diag = matrix[i - 1, j - 1] + score.mis_match_char(x[i - 1], y[j - 1])
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return matrix, trace_back


def get_aligned_sequences(x, y, trace_back):
    x_seq, y_seq = [], []
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            x_seq.append(x[i - 1])
            y_seq.append(y[j - 1])
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            x_seq.append("-")
            y_seq.append(y[j - 1])
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            x_seq.append(x[i - 1])
            y_seq.append("-")
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return x_seq, y_seq, torch.tensor(mapper_y_to_x, dtype=torch.int64)


def get_mapper(x, y, tokenizer, max_len=MAX_NUM_WORDS):
    x_seq = tokenizer.encode(x)
    y_seq = tokenizer.encode(y)
    score = ScoreParams(0, 1, -1)
    _, trace_back = global_align(x_seq, y_seq, score)
    mapper_base = get_aligned_sequences(x_seq, y_seq, trace_back)[-1]
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0] :] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len=MAX_NUM_WORDS):
    mappers, alphas = [], []
    for i in range(1, len(prompts)):
        mapper, alpha = get_mapper(prompts[0], prompts[i], tokenizer, max_len)
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


def get_word_inds(text, word_place, tokenizer):
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def get_replacement_mapper_(x, y, tokenizer, max_len=MAX_NUM_WORDS):
    words_x = x.split(" ")
    words_y = y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError("attention replacement edit can only be applied on prompts with the same length")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        else:
            mapper[i, j] = 1  # the authors: mapper[j, j] once no swapped word is left (see the module doc)
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def get_replacement_mapper(prompts, tokenizer, max_len=MAX_NUM_WORDS):
    return torch.stack([get_replacement_mapper_(prompts[0], p, tokenizer, max_len) for p in prompts[1:]])


# ------------------------------------------------------------------------------------ ptp_utils
def update_alpha_time_word(alpha, bounds, prompt_ind, word_inds=None):
    if type(bounds) is float:
        bounds = 0, bounds
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    if word_inds is None:
        word_inds = torch.arange(alpha.shape[2])
    alpha[:start, prompt_ind, word_inds] = 0
    alpha[start:end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer, max_num_words=MAX_NUM_WORDS):
    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    alpha_time_words = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha_time_words = update_alpha_time_word(alpha_time_words, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha_time_words = update_alpha_time_word(alpha_time_words, item, i, ind)
    return alpha_time_words.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)


def get_equalizer(text, word_select, values, tokenizer):
    if type(word_select) is int or type(word_select) is str:
        word_select = (word_select,)
    equalizer = torch.ones(1, 77)
    for word, val in zip(word_select, values):
        inds = get_word_inds(text, word, tokenizer)
        equalizer[:, inds] = val
    return equalizer


# ---------------------------------------------------------------------------------- controllers
class LocalBlend:
    def __call__(self, x_t, attention_store):
        self.counter += 1
        if self.counter > self.start_blend:
            k = 1
            cross = attention_store["down_cross"] + attention_store["up_cross"]
            res = self.resolution or min(math.isqrt(item.shape[1]) for item in cross)
            maps = [item for item in cross if item.shape[1] == res**2]
            maps = [item.reshape(self.alpha_layers.shape[0], -1, 1, res, res, MAX_NUM_WORDS) for item in maps]
            maps = torch.cat(maps, dim=1)
            maps = (maps * self.alpha_layers).sum(-1).mean(1)
            mask = nnf.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
            mask = nnf.interpolate(mask, size=(x_t.shape[2:]))
            mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
            mask = mask.gt(self.threshold)
            mask = (mask[:1] + mask).float()
            x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return x_t

    def __init__(self, prompts, words, tokenizer, num_steps, threshold=0.3, start_blend=0.2, resolution=None):
        alpha_layers = torch.zeros(len(prompts), 1, 1, 1, 1, MAX_NUM_WORDS)
        for i, (prompt, words_) in enumerate(zip(prompts, words)):
            if type(words_) is str:
                words_ = [words_]
            for word in words_:
                ind = get_word_inds(prompt, word, tokenizer)
                alpha_layers[i, :, :, :, :, ind] = 1
        self.alpha_layers = alpha_layers
        self.start_blend = int(start_blend * num_steps)
        self.counter = 0
        self.threshold = threshold
        self.resolution = resolution  # the authors' 16 (x16); None: the coarsest stored


class AttentionControl(abc.ABC):
    def step_callback(self, x_t):
        return x_t

    def between_steps(self):
        return

    @abc.abstractmethod
    def forward(self, attn, is_cross, place_in_unet):
        raise NotImplementedError

    def __call__(self, attn, is_cross, place_in_unet):
        h = attn.shape[0]
        attn[h // 2 :] = self.forward(attn[h // 2 :], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def __init__(self):
        self.cur_step = 0
        self.num_att_layers = -1
        self.cur_att_layer = 0


class AttentionStore(AttentionControl):
    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [], "down_self": [], "mid_self": [], "up_self": []}

    def forward(self, attn, is_cross, place_in_unet):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= 32**2:
            self.step_store[key].append(attn)
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    def __init__(self):
        super().__init__()
        self.step_store = self.get_empty_store()
        self.attention_store = {}


class AttentionControlEdit(AttentionStore, abc.ABC):
    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= 32**2:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base, att_replace):
        raise NotImplementedError

    def forward(self, attn, is_cross, place_in_unet):
        super().forward(attn, is_cross, place_in_unet)
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            h = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])
            attn_base, attn_repalce = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step]
                attn_repalce_new = (
                    self.replace_cross_attention(attn_base, attn_repalce) * alpha_words
                    + (1 - alpha_words) * attn_repalce
                )
                attn[1:] = attn_repalce_new
            else:
                attn[1:] = self.replace_self_attention(attn_base, attn_repalce)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer):
        super().__init__()
        self.batch_size = len(prompts)
        self.cross_replace_alpha = get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer)
        if type(self_replace_steps) is float:
            self_replace_steps = 0, self_replace_steps
        self.num_self_replace = int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])
        self.local_blend = local_blend


class AttentionReplace(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, tokenizer, local_blend=None):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer)
        self.mapper = get_replacement_mapper(prompts, tokenizer)


class AttentionRefine(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        return attn_base_replace * self.alphas + att_replace * (1 - self.alphas)

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, tokenizer, local_blend=None):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer)
        self.mapper, alphas = get_refinement_mapper(prompts, tokenizer)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])


class AttentionReweight(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        return attn_base[None, :, :, :] * self.equalizer[:, None, None, :]

    def __init__(
        self, prompts, num_steps, cross_replace_steps, self_replace_steps, equalizer, tokenizer,
        local_blend=None, controller=None,
    ):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer)
        self.equalizer = equalizer
        self.prev_controller = controller


# ------------------------------------------------------------------------------ hook and loop
class ReferenceAttnProcessor:
    """The authors' patched `forward` (`ptp_utils.register_attention_control`) as a processor."""

    def __init__(self, controller, place_in_unet):
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        attention_probs = self.controller(attention_probs, is_cross, self.place_in_unet)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        return hidden_states / attn.rescale_output_factor


@contextmanager
def controlled(unet, controller):
    """`controller` on every attention layer of `unet` (`ReferenceAttnProcessor`), restored after."""
    original = unet.attn_processors
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    unet.set_attn_processor(
        {name: ReferenceAttnProcessor(controller, places[name.split(".")[0]]) for name in original}
    )
    controller.num_att_layers = len(original)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


@torch.no_grad()
def reference_edit(pipe, inversion, prompts, controller, guidance_scale=7.5):
    """`[P, C, h, w]` latents: the authors' null-text `text2image_ldm_stable` loop with `controller`."""
    unet, tokenizer = pipe.unet, pipe.tokenizer
    with controlled(unet, controller):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(inversion.num_inference_steps)
        text_input = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        text_embeddings = pipe.text_encoder(text_input.input_ids)[0]
        latents = inversion.z_T[None].expand(len(prompts), *inversion.z_T.shape)
        for i, t in enumerate(scheduler.timesteps):
            context = torch.cat([inversion.null_embeddings[i][None].expand(*text_embeddings.shape), text_embeddings])
            noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
            noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents)["prev_sample"]
            latents = controller.step_callback(latents)
    return latents


def _check_processor_applies(unet):
    """`ReferenceAttnProcessor` skips the optional parts of diffusers' `Attention` (as the authors'
    patched forward did). SDXL's transformer-block attentions have none of them; fail loudly if a
    model does."""
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            unused = {
                "norm_cross": module.norm_cross, "group_norm": module.group_norm,
                "spatial_norm": module.spatial_norm, "norm_q": getattr(module, "norm_q", None),
                "norm_k": getattr(module, "norm_k", None),
            }
            present = [key for key, value in unused.items() if value is not None]
            if present or module.residual_connection:
                raise NotImplementedError(f"{name}: ReferenceAttnProcessor ignores {present or 'residual_connection'}")


@torch.no_grad()
def reference_edit_xl(pipe, inversion, prompts, controller, guidance_scale=7.5):
    """`[P, C, h, w]` latents: `reference_edit`'s loop for a `StableDiffusionXLPipeline`.

    The condition is diffusers' own `encode_prompt` (token embeddings and pooled embedding of each
    prompt); the unconditional half at step i is the inversion's null pair
    (`null_embeddings[i]`, `null_pooled_embeddings[i]`) for every prompt; the micro-conditioning
    time ids are `(R, R, 0, 0, R, R)` for every row, R the model's resolution. `inversion` is any
    object with `z_T [C, h, w]`, `null_embeddings [T, 77, D]`, `null_pooled_embeddings [T, P]` and
    `num_inference_steps`.
    """
    unet = pipe.unet
    _check_processor_applies(unet)
    with controlled(unet, controller):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(inversion.num_inference_steps)
        text_embeddings, _, pooled_embeddings, _ = pipe.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False
        )
        text_embeddings, pooled_embeddings = text_embeddings.float(), pooled_embeddings.float()
        resolution = unet.config.sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids(
            (resolution, resolution), (0, 0), (resolution, resolution), dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).repeat(2 * len(prompts), 1)
        latents = inversion.z_T[None].expand(len(prompts), *inversion.z_T.shape)
        for i, t in enumerate(scheduler.timesteps):
            context = torch.cat([inversion.null_embeddings[i][None].expand(*text_embeddings.shape), text_embeddings])
            pooled = torch.cat(
                [inversion.null_pooled_embeddings[i][None].expand(*pooled_embeddings.shape), pooled_embeddings]
            )
            noise_pred = unet(
                torch.cat([latents] * 2), t, encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            )["sample"]
            noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents)["prev_sample"]
            latents = controller.step_callback(latents)
    return latents
