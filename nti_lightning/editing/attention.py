"""Attention control through diffusers' attention-processor API, and a store of attention maps.

`controlled_attention(unet, hook)` swaps every attention processor of a UNet2DConditionModel for
a `ControlledAttnProcessor` that computes the attention probabilities explicitly and hands the
conditional half of the batch to `hook`; the original processors are put back on exit, also when
an error is raised. The sampler runs classifier-free guidance as one batch
`[uncond_0..uncond_{P-1}, cond_0..cond_{P-1}]` (see `nti_lightning.diffusion.guidance`), so the
hook sees `[P, heads, queries, keys]` maps of the P prompts and never the unconditional ones.

A hook may also see more: one with `edits_inputs` set gets every call's queries, keys and values
(`attend`, before the maps are computed: MasaCtrl's and Plug-and-Play's injections), and one
with `sees_all_rows` set gets the maps of both halves of the batch, unconditional rows first
(Pix2Pix-Zero's cross-attention guidance reads them all).

`AttentionStore` is the simplest hook: it sums the maps per layer over the sampling steps, which
is what LocalBlend and the cross-attention pictures read.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

#: Queries of the largest layers whose maps Prompt-to-Prompt keeps or replaces (32x32 positions).
MAX_QUERIES = 32**2


@dataclass(frozen=True)
class AttentionLayer:
    """Where an attention call happens.

    Args:
        name (`str`): the processor's key in `unet.attn_processors`.
        place (`str`): "down", "mid" or "up" (the UNet part), "other" elsewhere.
        is_cross (`bool`): cross-attention (keys are text tokens) rather than self-attention.
    """

    name: str
    place: str
    is_cross: bool


class AttentionHook(Protocol):
    """Receives `[P, heads, queries, keys]` conditional attention probabilities, returns them (edited or not)."""

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor: ...


class InputsHook(Protocol):
    """What a hook with `edits_inputs = True` also has: it sees (and may replace) every call's
    `[batch * heads, tokens, head dim]` queries, keys and values, batch-major as diffusers'
    `head_to_batch_dim` lays them out (row b * heads + h), both halves of classifier-free guidance."""

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, layer: AttentionLayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def unet_place(processor_name: str) -> str:
    """The UNet part ("down", "mid", "up" or "other") of a processor key such as "up_blocks.1....processor"."""
    prefix = processor_name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(prefix, "other")


def self_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """The processor names of `unet`'s self-attention layers (each transformer block's `attn1`)
    in the order a forward pass calls them: down blocks, middle block, up blocks. (The UNet
    registers its up blocks before its middle block, so `attn_processors` lists them otherwise.)

    Args:
        unet (`UNet2DConditionModel`): any Stable Diffusion UNet.
    """
    names = [name for name in unet.attn_processors if name.endswith("attn1.processor")]
    order = {"down": 0, "mid": 1, "up": 2, "other": 3}
    return sorted(names, key=lambda name: order[unet_place(name)])  # sorted() is stable: block order kept


def by_share(index: int, of: int, count: int) -> int:
    """`index` of a reference network's `of` layers (or steps), as the index with the same share
    of `count`: `round(index * count / of)`, halves rounded up (SD 1.5's self-attention layer 10
    of 16 is layer 10 of SD 1.5, 3 of the tiny model's 4).

    Args:
        index (`int`): the index in the reference's terms.
        of (`int`): the reference's count (16 layers, 50 steps).
        count (`int`): this network's (or run's) count.
    """
    return (2 * index * count + of) // (2 * of)


class ControlledAttnProcessor:
    """diffusers' plain `AttnProcessor` with the conditional attention maps routed through a hook.

    The probabilities are computed explicitly (as `AttnProcessor` does; fused kernels never expose
    them), so outputs match the default processor to float rounding, not bit for bit.

    Args:
        name (`str`): the processor's key in `unet.attn_processors`.
        hook (`AttentionHook`): called with the conditional half of every attention map.
    """

    def __init__(self, name: str, hook: AttentionHook) -> None:
        place = unet_place(name)
        self.hook = hook
        self.layers = {False: AttentionLayer(name, place, False), True: AttentionLayer(name, place, True)}

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        layer = self.layers[encoder_hidden_states is not None]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        if getattr(self.hook, "edits_inputs", False):
            query, key, value = self.hook.attend(query, key, value, attn.heads, layer)  # type: ignore[attr-defined]

        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self._controlled(probs, attn.heads, layer)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _controlled(self, probs: torch.Tensor, heads: int, layer: AttentionLayer) -> torch.Tensor:
        # head_to_batch_dim lays out [batch * heads] batch-major: row b * heads + h.
        batch = probs.shape[0] // heads
        if batch % 2:
            raise RuntimeError(
                f"attention control expects the [unconditional, conditional] batch of classifier-free "
                f"guidance; layer {layer.name} got a batch of {batch}"
            )
        maps = probs.view(batch, heads, *probs.shape[1:])
        if getattr(self.hook, "sees_all_rows", False):
            return self.hook(maps, layer).reshape(probs.shape)
        cond = maps[batch // 2 :]
        edited = self.hook(cond, layer)
        if edited is not cond:
            maps = torch.cat([maps[: batch // 2], edited.to(maps.dtype)])
        return maps.reshape(probs.shape)


@contextmanager
def controlled_attention(unet: UNet2DConditionModel, hook: AttentionHook) -> Iterator[None]:
    """Routes every attention map of `unet` through `hook` inside the `with` block.

    Args:
        unet (`UNet2DConditionModel`): any Stable Diffusion UNet (SD 1.x, 2.x, the tiny model).
        hook (`AttentionHook`): a controller or an `AttentionStore`.
    """
    original = unet.attn_processors
    # set_attn_processor pops entries from the dict it gets: always hand it a fresh one.
    unet.set_attn_processor({name: ControlledAttnProcessor(name, hook) for name in original})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


class AttentionStore:
    """Sums over sampling steps of the conditional attention maps of each layer.

    Maps are kept for layers with at most `max_queries` query positions (32x32, as the authors'
    store) and averaged over heads on the way in, so a layer costs `[P, queries, keys]` floats.
    They are the maps the UNet actually used, after any controller's edit, as in the authors' code.

    Args:
        max_queries (`int`, defaults to 1024): largest layers kept (query positions).
        keep_self (`bool`, defaults to False): also keep self-attention maps (`[P, q, q]` per layer).
    """

    def __init__(self, max_queries: int = MAX_QUERIES, keep_self: bool = False) -> None:
        self.max_queries = max_queries
        self.keep_self = keep_self
        self.reset()

    def reset(self) -> None:
        """Forgets everything (a new sampling run)."""
        self.sums: dict[AttentionLayer, torch.Tensor] = {}
        self.heads: dict[AttentionLayer, int] = {}
        self.num_steps = 0

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        self.record(probs, layer)
        return probs

    def record(self, probs: torch.Tensor, layer: AttentionLayer) -> None:
        """Adds `[P, heads, queries, keys]` maps of `layer` to its running sum."""
        if probs.shape[2] > self.max_queries or not (layer.is_cross or self.keep_self):
            return
        head_sum = probs.detach().float().sum(dim=1)
        if layer in self.sums:
            self.sums[layer] += head_sum
        else:
            self.sums[layer] = head_sum
            self.heads[layer] = probs.shape[1]

    def end_step(self) -> None:
        """Marks the end of one sampling step (one UNet call)."""
        self.num_steps += 1

    def resolutions(self, places: Sequence[str] = ("down", "up"), is_cross: bool = True) -> list[int]:
        """Side lengths of the square maps kept for the given UNet parts, ascending."""
        return sorted({_side(s.shape[1]) for layer, s in self.sums.items() if self._selected(layer, places, is_cross)})

    def maps(
        self,
        resolution: int,
        places: Sequence[str] = ("down", "up"),
        is_cross: bool = True,
        average: bool = True,
    ) -> torch.Tensor:
        """`[P, resolution, resolution, keys]` maps averaged over the layers' heads (and steps).

        Every head of every selected layer counts once, as the authors' `aggregate_attention`.

        Args:
            resolution (`int`): side of the maps (16 in the Prompt-to-Prompt figures for SD 1.x).
            places (`Sequence[str]`, defaults to ("down", "up")): UNet parts to average over.
            is_cross (`bool`, defaults to True): cross-attention (else self-attention) maps.
            average (`bool`, defaults to True): divide by the number of steps (else the sum over steps).
        """
        layers = [
            layer
            for layer, s in self.sums.items()
            if self._selected(layer, places, is_cross) and s.shape[1] == resolution**2
        ]
        if not layers:
            raise ValueError(
                f"no {'cross' if is_cross else 'self'}-attention maps of {resolution}x{resolution} in {tuple(places)}; "
                f"available: {self.resolutions(places, is_cross)}"
            )
        total = sum(self.sums[layer] for layer in layers) / sum(self.heads[layer] for layer in layers)
        if average:
            total = total / max(self.num_steps, 1)
        return total.reshape(total.shape[0], resolution, resolution, total.shape[-1])

    @staticmethod
    def _selected(layer: AttentionLayer, places: Sequence[str], is_cross: bool) -> bool:
        return layer.place in places and layer.is_cross == is_cross


def _side(queries: int) -> int:
    side = math.isqrt(queries)
    if side * side != queries:
        raise ValueError(f"attention maps over {queries} positions are not square")
    return side
