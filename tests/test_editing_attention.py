"""The attention processors on the tiny model: what the hook sees, what it changes, restoring."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.editing import (
    AttentionLayer,
    AttentionStore,
    ControlledAttnProcessor,
    controlled_attention,
)
from nti_lightning.models.loading import load_pipeline


@pytest.fixture(scope="module")
def unet():
    return load_pipeline("tiny").unet


def guidance_batch(prompts: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and `[uncond x P, cond x P]` text embeddings as the sampler batches them."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(prompts, 4, 8, 8, generator=generator)
    embeddings = torch.randn(2 * prompts, 77, 32, generator=generator)
    return torch.cat([latents, latents]), embeddings


class Recorder:
    """A hook that notes what it is given and optionally replaces cross-attention maps by uniform ones."""

    def __init__(self, uniform_cross: bool = False) -> None:
        self.calls: list[tuple[AttentionLayer, tuple[int, ...]]] = []
        self.uniform_cross = uniform_cross

    def __call__(self, probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        self.calls.append((layer, tuple(probs.shape)))
        if self.uniform_cross and layer.is_cross:
            return torch.full_like(probs, 1.0 / probs.shape[-1])
        return probs


@torch.no_grad()
def test_hook_sees_the_conditional_half_of_every_layer(unet):
    latents, embeddings = guidance_batch(prompts=3)
    recorder = Recorder()
    with controlled_attention(unet, recorder):
        unet(latents, 981, encoder_hidden_states=embeddings)
    assert len(recorder.calls) == len(unet.attn_processors) == 8
    seen = {(layer.place, layer.is_cross): shape for layer, shape in recorder.calls}
    heads = unet.config.attention_head_dim  # for SD UNets, diffusers' name for the number of heads
    assert seen[("down", True)] == (3, heads, 64, 77)  # 3 prompts: the conditional half only
    assert seen[("down", False)] == (3, heads, 64, 64)
    assert seen[("mid", True)] == (3, heads, 16, 77)
    assert seen[("up", True)] == (3, heads, 64, 77)


@torch.no_grad()
def test_passthrough_matches_the_default_processors_and_restores_them(unet):
    latents, embeddings = guidance_batch()
    before = unet.attn_processors
    expected = unet(latents, 500, encoder_hidden_states=embeddings).sample
    with controlled_attention(unet, AttentionStore()):
        assert all(isinstance(p, ControlledAttnProcessor) for p in unet.attn_processors.values())
        controlled = unet(latents, 500, encoder_hidden_states=embeddings).sample
    assert torch.allclose(controlled, expected, atol=1e-5)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


@torch.no_grad()
def test_edited_maps_are_used_for_the_conditional_rows_only(unet):
    latents, embeddings = guidance_batch()
    with controlled_attention(unet, Recorder(uniform_cross=True)):
        controlled = unet(latents, 500, encoder_hidden_states=embeddings).sample
    plain = unet(latents, 500, encoder_hidden_states=embeddings).sample
    # Uniform cross-attention over the tokens is what the model does when all tokens are the same:
    # attention to 77 copies of the mean token gives the mean of the values (to_v is linear).
    mean_tokens = embeddings.mean(dim=1, keepdim=True).expand_as(embeddings)
    uniform = unet(latents, 500, encoder_hidden_states=mean_tokens).sample
    assert torch.allclose(controlled[:2], plain[:2], atol=1e-5)  # unconditional rows untouched
    assert torch.allclose(controlled[2:], uniform[2:], atol=1e-4)
    assert not torch.allclose(controlled[2:], plain[2:], atol=1e-3)


@torch.no_grad()
def test_processors_restored_after_an_error(unet):
    before = unet.attn_processors

    def failing(probs: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        raise KeyError("hook failed")

    latents, embeddings = guidance_batch()
    with pytest.raises(KeyError, match="hook failed"):
        with controlled_attention(unet, failing):
            unet(latents, 10, encoder_hidden_states=embeddings)
    assert all(unet.attn_processors[name] is before[name] for name in before)


@torch.no_grad()
def test_a_batch_without_guidance_halves_is_refused(unet):
    latents, embeddings = guidance_batch(prompts=1)
    with pytest.raises(RuntimeError, match="classifier-free guidance"):
        with controlled_attention(unet, AttentionStore()):
            unet(latents[:1], 10, encoder_hidden_states=embeddings[:1])
    assert not any(isinstance(p, ControlledAttnProcessor) for p in unet.attn_processors.values())
