"""Prompt encoding, padded to the tokenizer's length as Stable Diffusion does."""

from __future__ import annotations

import warnings

import torch
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """`[len(prompts), 77, D]` fp32 text-encoder outputs; `""` gives the null embedding ∅.

    Prompts longer than the tokenizer's 77 tokens are truncated with a warning naming them.
    """
    max_length = tokenizer.model_max_length
    for prompt in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > max_length:
            warnings.warn(
                f"prompt {prompt!r} has {length} tokens; only the first {max_length} are used", stacklevel=2
            )
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0].float()
