"""Words to tokens, the word-swap and refinement mappers, and the cross-attention step windows."""

from __future__ import annotations

import p2p_reference as ref
import pytest
import torch

from nti_lightning.editing.alignment import (
    global_alignment,
    prompt_words,
    refinement_mapper,
    replacement_mapper,
    word_positions,
)
from nti_lightning.editing.controllers import AttentionController, cross_replace_windows
from nti_lightning.models.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_words_know_their_tokens_including_split_words(tokenizer):
    words = prompt_words("a hippopotamus on grass", tokenizer)
    assert [w.word for w in words] == ["a", "hippopotamus", "on", "grass"]
    assert [w.positions for w in words] == [(1,), (2, 3, 4), (5,), (6,)]  # "hippo" "potam" "us"


def test_word_positions_match_case_and_punctuation(tokenizer):
    prompt = "A Cat, a cat and a hippopotamus."
    assert word_positions(prompt, "cat", tokenizer) == [2, 5]  # "Cat," -> only the token of "Cat"
    assert word_positions(prompt, "hippopotamus", tokenizer) == [8, 9, 10]
    assert word_positions(prompt, "Cat,", tokenizer) == [2, 3]  # the word as written, comma included
    assert word_positions("a cat", "cat", tokenizer) == list(ref.get_word_inds("a cat", "cat", tokenizer))


def test_word_not_in_prompt_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"word 'dog' is not in prompt 'a cat'"):
        word_positions("a cat", "dog", tokenizer)
    with pytest.raises(ValueError, match="not a single word"):
        word_positions("a red cat", "red cat", tokenizer)


def test_prompt_longer_than_the_window_is_refused(tokenizer):
    with pytest.raises(ValueError, match="tokens"):
        prompt_words("cat " * 80, tokenizer)


def test_replacement_mapper_same_token_counts_is_a_permutation_of_identity(tokenizer):
    mapper = replacement_mapper("a cat on a sofa", "a dog on a sofa", tokenizer)
    assert torch.equal(mapper, torch.eye(77))  # one token each: position to position
    assert torch.equal(mapper, ref.get_replacement_mapper(["a cat on a sofa", "a dog on a sofa"], tokenizer)[0])


def test_replacement_mapper_splits_a_word_into_k_tokens_with_weight_one_over_k(tokenizer):
    source, target = "a cat on grass", "a hippopotamus on grass"
    mapper = replacement_mapper(source, target, tokenizer)
    # source: <s> a cat on grass </s>; target: <s> a hippo potam us on grass </s>
    assert torch.allclose(mapper[2, 2:5], torch.full((3,), 1 / 3))
    assert mapper[2].sum() == pytest.approx(1.0)
    assert mapper[3, 5] == 1 and mapper[4, 6] == 1 and mapper[5, 7] == 1  # "on", "grass", </s> stay aligned
    assert mapper[74, 76] == 1 and mapper[:, :2].sum() == 2  # padding aligned to the end; <s> and "a"
    assert torch.equal(mapper, ref.get_replacement_mapper([source, target], tokenizer)[0])
    # The other way: the one token of "cat" sums the three of "hippopotamus".
    back = replacement_mapper(target, source, tokenizer)
    assert torch.equal(back[2:5, 2], torch.ones(3)) and back[5, 3] == 1 and back[:, 75:].sum() == 0


def test_replace_needs_the_same_number_of_words(tokenizer):
    with pytest.raises(ValueError, match=r"'a cat' has 2 and 'a big dog' has 3"):
        replacement_mapper("a cat", "a big dog", tokenizer)


def test_global_alignment_marks_insertions():
    assert global_alignment([1, 5, 9, 2], [1, 5, 7, 8, 9, 2]) == [0, 1, None, None, 2, 3]
    assert global_alignment([1, 5, 9, 2], [1, 9, 2]) == [0, 2, 3]  # a dropped source token
    assert global_alignment([], [4, 4]) == [None, None]


@pytest.mark.parametrize(
    "source, target",
    [
        ("a cat on a sofa", "a fluffy cat on a red sofa"),
        ("a photo of a house", "a photo of a house at night in the snow"),
        ("a dog running on the beach", "a dog running"),
        ("a cat", "a cat"),
    ],
)
def test_refinement_mapper_agrees_with_the_authors_alignment(tokenizer, source, target):
    mapper, weights = refinement_mapper(source, target, tokenizer)
    ref_mapper, ref_weights = ref.get_refinement_mapper([source, target], tokenizer)
    assert torch.equal(weights, ref_weights[0])
    aligned = weights.bool()
    assert torch.equal(mapper[aligned], ref_mapper[0][aligned])  # inserted tokens' entries are unused


def test_refinement_mapper_inserted_words_keep_their_own_maps(tokenizer):
    mapper, weights = refinement_mapper("a cat", "a fluffy cat", tokenizer)
    assert weights[:5].tolist() == [1, 1, 0, 1, 1]  # <s> a fluffy cat </s>
    assert mapper[:5].tolist()[:2] == [0, 1] and mapper[3] == 2 and mapper[4] == 3


def test_cross_replace_windows_per_word_match_the_authors_alpha(tokenizer):
    prompts = ["a cat riding a bicycle", "a dog riding a car", "a hippopotamus riding a car"]
    steps = {"default_": (0.2, 0.9), "car": 0.3}
    controller = AttentionController(prompts, tokenizer, cross_replace_steps=steps)  # the base computes the windows
    for num_steps in (5, 10, 50):
        controller.begin(num_steps)
        expected = ref.get_time_words_attention_alpha(prompts, num_steps, dict(steps), tokenizer)[:num_steps]
        assert torch.equal(controller.cross_alpha, expected.reshape(num_steps, 2, 77))


def test_cross_replace_steps_are_validated(tokenizer):
    prompts = ["a cat", "a dog"]
    with pytest.raises(ValueError, match="'tiger' is in none of the edit prompts"):
        cross_replace_windows(prompts, tokenizer, {"tiger": 0.3})
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        cross_replace_windows(prompts, tokenizer, (0.8, 0.2))
    with pytest.raises(ValueError, match="fraction"):
        cross_replace_windows(prompts, tokenizer, "most")
