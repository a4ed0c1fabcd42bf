"""Tokenizer, tiny models, pipeline loading and prompt encoding."""

import pytest
import torch

from nti_lightning import load_pipeline
from nti_lightning.models.text import encode_prompts
from nti_lightning.models.tokenizer import VOCAB_SIZE, clip_tokenizer


def test_tokenizer_matches_clip_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == 49408
    # openai/clip-vit-large-patch14's ids for this prompt
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:2] == [49406, 49407]


def test_tiny_model_is_seeded():
    a, b = load_pipeline("tiny"), load_pipeline("tiny")
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)
    assert a.scheduler.config.clip_sample is False and a.scheduler.config.set_alpha_to_one is False
    assert load_pipeline("tiny-v").scheduler.config.prediction_type == "v_prediction"


def test_local_folder_round_trip(tmp_path):
    pipe = load_pipeline("tiny")
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(str(tmp_path / "model"))
    for p, q in zip(pipe.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(p, q)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bad_model_references(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="model.ckpt: pickled checkpoints are not loaded"):
        load_pipeline(str(tmp_path / "model.ckpt"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors: checkpoint file not found"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_long_prompt_warns_and_truncates():
    pipe = load_pipeline("tiny")
    long_prompt = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match="has 102 tokens; only the first 77 are used"):
        embedding = encode_prompts(pipe.tokenizer, pipe.text_encoder, [long_prompt])
    assert embedding.shape == (1, 77, 32)
