"""CLIP's BPE tokenizer, built offline from the merge list shipped in the package.

Stable Diffusion 1.x tokenizes prompts with `openai/clip-vit-large-patch14`'s tokenizer. Its
vocabulary is fully determined by CLIP's merge list: the 256 byte symbols, the same symbols with
the end-of-word marker `</w>`, one entry per merge, and the two special tokens (49,408 in all).
Rebuilding it here gives the tiny models the exact tokenization of the real ones without a
download.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

#: Number of merges CLIP keeps from the list (49152 - 256 - 2).
_NUM_MERGES = 48894
#: Size of the derived vocabulary.
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and merges ("a b" strings) of CLIP's tokenizer."""
    data = resources.files("nti_lightning.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A `CLIPTokenizer` identical to Stable Diffusion 1.x's, built without network access.

    Args:
        model_max_length (`int`, defaults to 77): the padded/truncated prompt length.
    """
    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)
