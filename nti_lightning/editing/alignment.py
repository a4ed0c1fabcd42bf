"""Words to token positions, and how an edit prompt's tokens line up with the source prompt's.

Cross-attention maps are indexed by token position in the padded text sequence (position 0 is
the start token, then the prompt's tokens, then the end token and padding up to the tokenizer's
length, 77 for Stable Diffusion). Prompt-to-Prompt edits those maps, so every controller first
needs to know which positions a word occupies and which source position feeds which edit
position:

* `replacement_mapper` (word swap, `Replace`): word i of the edit takes the maps of word i of the
  source; a word split into k tokens gets 1/k of the source word's maps on each token.
* `refinement_mapper` (added words, `Refine`): a global alignment of the token ids; aligned
  tokens take the source's maps, inserted tokens keep their own.

Semantics follow `seq_aligner.py` of google/prompt-to-prompt, with one deliberate difference:
after a swapped word whose token count differs from the source word's, the authors' mapper maps
the remaining positions j -> j (misaligned by the count difference); here they stay aligned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

#: Leading punctuation, the word itself, trailing punctuation ("(cat)," -> "(", "cat", "),").
_WORD_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class WordTokens:
    """One whitespace-separated word of a prompt and the token positions it occupies.

    Args:
        word (`str`): the word as written in the prompt.
        positions (`tuple[int, ...]`): its positions in the padded token sequence (start token = 0).
    """

    word: str
    positions: tuple[int, ...]


def _token_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_words(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[WordTokens]:
    """The words of `prompt` (split on whitespace) with their token positions.

    Raises `ValueError` naming the prompt when it does not fit the tokenizer's window (start and
    end tokens included), since positions past it have no attention maps.
    """
    full = list(tokenizer(prompt).input_ids)
    words, position, ids = [], 1, []
    for word in prompt.split():
        word_ids = _token_ids(word, tokenizer)
        words.append(WordTokens(word, tuple(range(position, position + len(word_ids)))))
        position += len(word_ids)
        ids += word_ids
    # CLIP's tokenizer splits on whitespace before BPE, so word-by-word tokenization must agree
    # with tokenizing the whole prompt; a tokenizer that merges across words cannot be mapped.
    if ids != full[1:-1]:
        raise ValueError(f"prompt {prompt!r}: its words do not tokenize independently; cannot map words to tokens")
    window = tokenizer.model_max_length
    if len(full) > window:
        raise ValueError(
            f"prompt {prompt!r} has {len(full)} tokens with start and end tokens; Prompt-to-Prompt editing "
            f"needs at most {window} (shorten the prompt)"
        )
    return words


def word_positions(prompt: str, word: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token positions of every occurrence of `word` in `prompt`.

    A prompt word matches when it equals `word` ignoring case, or when it does once punctuation
    at either end is set aside ("cat" matches "cat," and only the tokens of "cat" are returned).

    Raises:
        `ValueError` naming the word and the prompt when the word does not occur.
    """
    if not word or word != word.strip() or len(word.split()) != 1:
        raise ValueError(f"{word!r} is not a single word (prompt {prompt!r})")
    wanted = word.lower()
    positions: list[int] = []
    for item in prompt_words(prompt, tokenizer):
        if item.word.lower() == wanted:
            positions += item.positions
            continue
        lead, core, trail = _WORD_CORE.match(item.word).groups()
        if core.lower() != wanted:
            continue
        lead_ids, core_ids = _token_ids(lead, tokenizer), _token_ids(core, tokenizer)
        if lead_ids + core_ids + _token_ids(trail, tokenizer) == _token_ids(item.word, tokenizer):
            start = item.positions[0] + len(lead_ids)
            positions += range(start, start + len(core_ids))
        else:  # punctuation merged into the word's tokens: the whole word is the closest match
            positions += item.positions
    if not positions:
        raise ValueError(f"word {word!r} is not in prompt {prompt!r}")
    return positions


def replacement_mapper(source: str, edit: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """`[K, K]` matrix M with edit maps = source maps @ M (K = the tokenizer's length, 77).

    The prompts must have the same number of words. Word i of the edit takes the maps of word i
    of the source: token-to-token when both have as many tokens, otherwise each of the edit
    word's k tokens gets 1/k of the sum of the source word's token maps. The start token, the end
    token and the padding keep their own (aligned) maps.

    Raises:
        `ValueError` naming both prompts when their word counts differ.
    """
    source_words, edit_words = prompt_words(source, tokenizer), prompt_words(edit, tokenizer)
    if len(source_words) != len(edit_words):
        raise ValueError(
            f"Replace needs prompts with the same number of words, but {source!r} has {len(source_words)} "
            f"and {edit!r} has {len(edit_words)}; use Refine for added words"
        )
    length = tokenizer.model_max_length
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0
    for source_word, edit_word in zip(source_words, edit_words):
        src, dst = list(source_word.positions), list(edit_word.positions)
        if len(src) == len(dst):
            mapper[src, dst] = 1.0
        else:
            mapper[torch.tensor(src)[:, None], torch.tensor(dst)[None, :]] = 1.0 / len(dst)
    # End token and padding: aligned from the ends of the two prompts on.
    i = source_words[-1].positions[-1] + 1 if source_words else 1
    j = edit_words[-1].positions[-1] + 1 if edit_words else 1
    while i < length and j < length:
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


def global_alignment(source_ids: list[int], edit_ids: list[int]) -> list[int | None]:
    """Needleman-Wunsch alignment of two token-id sequences (match 1, mismatch -1, gap 0).

    Returns, for each edit token, the index of the source token it is aligned with, or `None`
    for an inserted token. Ties prefer an insertion, then a deletion, then a (mis)match, which
    is the order of the authors' traceback.
    """
    rows, cols = len(source_ids), len(edit_ids)
    score = [[0] * (cols + 1) for _ in range(rows + 1)]
    # Traceback: "left" = edit token inserted, "up" = source token dropped, "diag" = aligned.
    move = [["left"] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        move[i][0] = "up"
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if source_ids[i - 1] == edit_ids[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            move[i][j] = "left" if score[i][j] == left else "up" if score[i][j] == up else "diag"
    aligned: list[int | None] = [None] * cols
    i, j = rows, cols
    while i > 0 or j > 0:
        step = move[i][j] if i > 0 and j > 0 else ("left" if i == 0 else "up")
        if step == "diag":
            aligned[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif step == "left":
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_mapper(
    source: str, edit: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """`([K] source position per edit position, [K] 1 where the edit token is aligned, else 0)`.

    Tokens of the edit aligned with a source token take that token's maps; inserted tokens keep
    their own (weight 0; their mapper entry points at themselves and is unused). Positions past
    the edit's end token map to the same position of the source, as the authors' code does.
    """
    prompt_words(source, tokenizer), prompt_words(edit, tokenizer)  # window checks, named errors
    source_ids, edit_ids = list(tokenizer(source).input_ids), list(tokenizer(edit).input_ids)
    length = tokenizer.model_max_length
    mapper = torch.arange(length)
    weights = torch.ones(length)
    for j, i in enumerate(global_alignment(source_ids, edit_ids)):
        if i is None:
            weights[j] = 0.0
        else:
            mapper[j] = i
    return mapper, weights
