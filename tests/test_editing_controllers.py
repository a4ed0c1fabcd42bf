"""Controllers, the attention store and LocalBlend on synthetic attention maps."""

from __future__ import annotations

import p2p_reference as ref
import pytest
import torch

from nti_lightning.editing import (
    AttentionLayer,
    AttentionStore,
    LocalBlend,
    Refine,
    Replace,
    Reweight,
)
from nti_lightning.models.tokenizer import clip_tokenizer

CROSS = AttentionLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "down", True)
SELF = AttentionLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", "down", False)
HEADS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def synthetic_maps(prompts: int, queries: int, keys: int = 77, seed: int = 0) -> torch.Tensor:
    """`[P, heads, queries, keys]` random attention probabilities (rows sum to 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(prompts, HEADS, queries, keys, generator=generator).softmax(-1)


def test_replace_maps_source_tokens_onto_the_edit(tokenizer):
    prompts = ["a cat on grass", "a hippopotamus on grass"]
    controller = Replace(prompts, tokenizer, cross_replace_steps=0.5, self_replace_steps=0.0).begin(10)
    maps = synthetic_maps(2, 16)
    out = controller(maps.clone(), CROSS)
    assert torch.equal(out[0], maps[0])  # the source is never touched
    for token in (2, 3, 4):  # "hippo" "potam" "us" each get a third of "cat"
        assert torch.allclose(out[1, :, :, token], maps[0, :, :, 2] / 3)
    assert torch.allclose(out[1, :, :, 5], maps[0, :, :, 3])  # "on" keeps its alignment
    controller.step = 5  # int(0.5 * (10 + 1)) = 5: the window is over
    assert torch.equal(controller(maps.clone(), CROSS), maps)


def test_refine_inserted_tokens_keep_their_own_maps(tokenizer):
    controller = Refine(["a cat", "a fluffy cat"], tokenizer, cross_replace_steps=1.0).begin(4)
    maps = synthetic_maps(2, 16)
    out = controller(maps.clone(), CROSS)
    assert torch.equal(out[1, :, :, 2], maps[1, :, :, 2])  # "fluffy" is new
    assert torch.equal(out[1, :, :, 3], maps[0, :, :, 2])  # "cat" from the source's "cat"
    assert torch.equal(out[1, :, :, 4], maps[0, :, :, 3])  # </s> from the source's </s>


def test_reweight_scales_the_words_alone_and_on_top_of_replace(tokenizer):
    prompts = ["a red car", "a red car"]
    alone = Reweight(prompts, tokenizer, words={"red": 4.0}).begin(4)
    maps = synthetic_maps(2, 16)
    out = alone(maps.clone(), CROSS)
    assert torch.allclose(out[1, :, :, 2], 4 * maps[0, :, :, 2])
    assert torch.allclose(out[1, :, :, 3], maps[0, :, :, 3])
    swap = ["a red car", "a red bicycle"]
    base = Replace(swap, tokenizer, cross_replace_steps=0.3)
    stacked = Reweight(swap, tokenizer, words={"red": 0.5}, base=base).begin(9)
    assert stacked.cross_replace_steps == 0.3  # the base's windows unless given
    out = stacked(maps.clone(), CROSS)
    assert torch.allclose(out[1, :, :, 2], 0.5 * maps[0, :, :, 2]) and torch.allclose(out[1, :, :, 3], maps[0, :, :, 3])


def test_self_attention_replaced_in_its_window_and_only_up_to_32x32(tokenizer):
    controller = Replace(["a cat", "a dog"], tokenizer, self_replace_steps=(0.2, 0.6)).begin(10)
    small, large = synthetic_maps(2, 16, keys=16), synthetic_maps(2, 33 * 33, keys=8)
    for step, replaced in [(1, False), (2, True), (5, True), (6, False)]:
        controller.step = step
        out = controller(small.clone(), SELF)
        assert torch.equal(out[1], small[0] if replaced else small[1]), step
        assert torch.equal(controller(large.clone(), SELF), large)  # 1089 queries: never replaced


def paired_controllers(kind: str, tokenizer, num_steps: int):
    """The same edit as one of our controllers and as the reference's."""
    if kind == "replace":
        prompts, steps = ["a cat on a hippopotamus", "a hippopotamus on a dog"], {"default_": 0.7, "dog": (0.2, 0.5)}
        return Replace(prompts, tokenizer, steps, 0.5), ref.AttentionReplace(prompts, num_steps, steps, 0.5, tokenizer)
    if kind == "refine":
        prompts = ["a cat on a sofa", "a fluffy cat on a red sofa"]
        return (
            Refine(prompts, tokenizer, 0.8, (0.1, 0.4)),
            ref.AttentionRefine(prompts, num_steps, 0.8, (0.1, 0.4), tokenizer),
        )
    if kind == "reweight":
        prompts, words = ["a cat on a sofa", "a cat on a sofa"], {"cat": 3.0, "sofa": 0.5}
        base = ref_base = None
    else:  # reweight on top of refine
        prompts, words = ["a cat on a sofa", "a smiling cat on a sofa"], {"smiling": 3.0, "sofa": 0.5}
        base = Refine(prompts, tokenizer, 0.8, 0.4)
        ref_base = ref.AttentionRefine(prompts, num_steps, 0.8, 0.4, tokenizer)
    equalizer = ref.get_equalizer(prompts[1], tuple(words), tuple(words.values()), tokenizer)
    return (
        Reweight(prompts, tokenizer, words=words, base=base, cross_replace_steps=0.8, self_replace_steps=0.4),
        ref.AttentionReweight(prompts, num_steps, 0.8, 0.4, equalizer, tokenizer, controller=ref_base),
    )


@pytest.mark.parametrize("kind", ["replace", "refine", "reweight", "reweight_on_refine"])
def test_controllers_agree_with_the_authors_on_every_step(tokenizer, kind):
    num_steps, queries = 6, 16
    ours, theirs = paired_controllers(kind, tokenizer, num_steps)
    ours.begin(num_steps)
    for step in range(num_steps):
        ours.step, theirs.cur_step = step, step
        for layer, keys in ((CROSS, 77), (SELF, queries)):
            maps = synthetic_maps(2, queries, keys, seed=step)
            expected = theirs.forward(maps.clone().reshape(2 * HEADS, queries, keys), layer.is_cross, "down")
            assert torch.allclose(ours(maps.clone(), layer), expected.reshape(maps.shape), atol=1e-7), (step, layer)


def test_store_averages_heads_layers_and_steps():
    store = AttentionStore()
    up = AttentionLayer("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "up", True)
    first, second = synthetic_maps(2, 16, seed=1), synthetic_maps(2, 16, seed=2)
    for maps in (first, second):
        store(maps, CROSS)
        store(2 * maps, up)
        store(maps, SELF)  # self-attention is not kept by default
        store(synthetic_maps(2, 33 * 33, 77), CROSS)  # too large: not kept
        store.end_step()
    assert store.resolutions() == [4] and store.num_steps == 2
    expected = (first + second).mean(1) * 1.5 / 2  # heads of both layers, then steps
    assert torch.allclose(store.maps(4), expected.reshape(2, 4, 4, 77), atol=1e-6)
    assert torch.allclose(store.maps(4, places=("down",), average=False), (first + second).mean(1).reshape(2, 4, 4, 77))
    with pytest.raises(ValueError, match="available"):
        store.maps(8)


def blend_store(word_region: torch.Tensor, word_position: int) -> AttentionStore:
    """A store whose 4x4 cross-attention maps put all of `word_position`'s weight in `word_region`."""
    maps = torch.zeros(2, HEADS, 16, 77)
    maps[..., 0] = 1.0
    maps[:, :, :, word_position] = word_region.reshape(2, 1, 16)
    store = AttentionStore()
    store(maps, CROSS)
    store.end_step()
    return store


def test_local_blend_keeps_the_source_outside_the_words_region(tokenizer):
    prompts = ["a cat on grass", "a dog on grass"]
    blend = LocalBlend(prompts, tokenizer, [["cat"], "dog"], threshold=0.3, start=0.2)
    region = torch.zeros(2, 4, 4)
    region[0, 0, 0] = 1.0  # source: "cat" attends to the top-left cell
    region[1, 3, 3] = 1.0  # edit: "dog" to the bottom-right cell
    region[1, 0, 3] = 0.2  # below 0.3 of the peak even after pooling: not in the mask
    store = blend_store(region, word_position=2)
    mask = blend.mask(store, (8, 8))
    # 3x3 max-pool grows each cell to its neighbours; nearest upsampling doubles them.
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    expected[4:, 4:] = True
    assert torch.equal(mask[1, 0], expected)  # union of the edit's and the source's regions
    source_only = torch.zeros(8, 8, dtype=torch.bool)
    source_only[:4, :4] = True
    assert torch.equal(mask[0, 0], source_only)
    latents = torch.randn(2, 4, 8, 8)
    blended = blend(latents, store, step=2, num_steps=10)
    assert torch.equal(blended[1][:, ~expected], latents[0][:, ~expected])
    assert torch.allclose(blended[1][:, expected], latents[1][:, expected], atol=1e-6)  # x_src + (x - x_src)
    assert torch.equal(blended[0], latents[0])


def test_local_blend_starts_after_a_fifth_of_the_steps(tokenizer):
    blend = LocalBlend(["a cat", "a dog"], tokenizer, ["cat", "dog"])
    region = torch.zeros(2, 4, 4)
    region[:, 0, 0] = 1.0
    store, latents = blend_store(region, 2), torch.randn(2, 4, 8, 8)
    assert blend.start_step(10) == 2 and blend.start_step(50) == 10 and blend.start_step(5) == 1
    assert blend(latents, store, step=1, num_steps=10) is latents
    assert not torch.equal(blend(latents, store, step=2, num_steps=10), latents)


def test_bad_words_and_prompts_are_named(tokenizer):
    with pytest.raises(ValueError, match="word 'tiger' is not in prompt 'a dog'"):
        LocalBlend(["a cat", "a dog"], tokenizer, ["cat", "tiger"])
    with pytest.raises(ValueError, match="one entry of words per prompt"):
        LocalBlend(["a cat", "a dog"], tokenizer, ["cat"])
    with pytest.raises(ValueError, match="word 'blue' is not in prompt 'a red car'"):
        Reweight(["a red car", "a red car"], tokenizer, words={"blue": 2.0})
    with pytest.raises(ValueError, match="'a cat' has 2 and 'a big dog' has 3"):
        Replace(["a cat", "a big dog"], tokenizer)
    with pytest.raises(ValueError, match="local_blend was built for prompts"):
        Replace(["a cat", "a dog"], tokenizer, local_blend=LocalBlend(["a cat", "a cow"], tokenizer, ["cat", "cow"]))
    with pytest.raises(ValueError, match="at least one edit prompt"):
        Replace(["a cat"], tokenizer)
    controller = Replace(["a cat", "a dog"], tokenizer).begin(3)
    with pytest.raises(RuntimeError, match="built for 2 prompts got a batch of 3"):
        controller(synthetic_maps(3, 16), CROSS)


def test_cross_forms_are_the_controllers_replace_cross(tokenizer):
    from nti_lightning.editing.controllers import cross_form_of

    swap = ["a cat on grass", "a hippopotamus on grass", "a dog on grass"]
    refine = ["a cat on grass", "a small cat on green grass"]
    controllers = [
        Replace(swap, tokenizer),
        Refine(refine, tokenizer),
        Reweight(swap, tokenizer, words={"grass": 3.0}),
        Reweight(refine, tokenizer, words={"green": 0.5}, base=Refine(refine, tokenizer)),
        Reweight(
            swap,
            tokenizer,
            words={"on": 2.0},
            base=Reweight(swap, tokenizer, words={"grass": 3.0}, base=Replace(swap, tokenizer)),
        ),
    ]
    for controller in controllers:
        maps = synthetic_maps(len(controller.prompts), 16)
        form = cross_form_of(controller)
        mapped = torch.einsum("hqw,pwn->phqn", maps[0], form.mapper)
        aligned, factors = form.aligned[:, None, None, :], form.factors[:, None, None, :]
        expected = controller.replace_cross(maps[0], maps[1:])
        torch.testing.assert_close(
            (mapped * aligned + maps[1:] * (1 - aligned)) * factors, expected, rtol=1e-6, atol=1e-7
        )

    class Halved(Replace):  # a subclass that changes replace_cross alone has no form
        def replace_cross(self, base, edits):
            return 0.5 * super().replace_cross(base, edits)

    assert cross_form_of(Halved(swap, tokenizer)) is None
    assert cross_form_of(Reweight(swap, tokenizer, words={"on": 2.0}, base=Halved(swap, tokenizer))) is None


def test_a_subclass_of_its_own_kind_keeps_its_own_calls(tokenizer):
    prompts = ["a cat on grass", "a dog on grass"]
    calls = []

    class Negated(LocalBlend):  # a blend of its own class
        def __call__(self, latents, store, step, num_steps):
            calls.append((store, step, num_steps))
            return -latents

    class Extended(Replace):  # its own attention call, on top of the base's
        def __call__(self, probs, layer):
            return super().__call__(probs, layer)

    assert Replace(prompts, tokenizer).begin(4).job_control() is not None  # built-in: batched with others
    assert Extended(prompts, tokenizer).begin(4).job_control() is None
    controller = Replace(prompts, tokenizer, local_blend=Negated(prompts, tokenizer, ["cat", "dog"])).begin(4)
    assert controller.job_control() is None
    # its own calls: the maps are edited as Replace's, the blend is called with the controller's store
    maps = synthetic_maps(2, 16)
    torch.testing.assert_close(
        controller(maps.clone(), CROSS), Replace(prompts, tokenizer).begin(4)(maps.clone(), CROSS)
    )
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(controller.end_step(0, 981, latents), -latents)
    assert calls == [(controller.store, 0, 4)] and controller.step == 1 and controller.store.num_steps == 1
