"""What the diffusion stage's grounding loss reads: cross-attention maps and the caption words' token positions.

`RecordingCrossAttnProcessor` keeps each cross-attention map of a UNet call (with its autograd
graph); `grounded_token_positions` says which tokens of a caption name the shape and which the
background. `DiffusionStage.grounding_loss` combines them with the images' shape masks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers.models.attention_processor import Attention
from transformers import CLIPTokenizer

from nti_lightning.demo.shapes import (
    BACKGROUND_COLORS,
    BACKGROUND_WORDS,
    SHAPE_WORDS,
    SHAPES,
    caption_for,
)


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
