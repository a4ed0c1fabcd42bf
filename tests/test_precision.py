"""Mixed precision keeps the embedding, Adam and DDIM arithmetic in fp32."""

import pytest
import torch
from conftest import random_image

import nti_lightning as nti


@pytest.mark.parametrize("precision", ["bf16-mixed"])  # 16-mixed needs a GPU (Lightning uses bf16 on CPU)
def test_mixed_precision_close_to_fp32(independent_pipeline, precision):
    image, prompt = random_image(0), "a red circle"
    options = dict(num_inference_steps=4, num_inner_steps=3)
    [full] = nti.invert(independent_pipeline, image, prompt, precision="32-true", **options)
    [mixed] = nti.invert(independent_pipeline, image, prompt, precision=precision, **options)
    assert mixed.null_embeddings.dtype == torch.float32
    assert next(independent_pipeline.unet.parameters()).dtype == torch.float32
    z_error = float((mixed.z_T - full.z_T).norm() / full.z_T.norm())
    assert 0 < z_error < 0.05  # the UNet really ran in half precision, and stayed close
    # the optimisation moved the embeddings the same way (its steps are lr-sized sign-like moves,
    # so compare directions rather than values)
    from nti_lightning.models.text import encode_prompts

    empty = encode_prompts(independent_pipeline.tokenizer, independent_pipeline.text_encoder, [""])
    moved_full, moved_mixed = (full.null_embeddings - empty).flatten(), (mixed.null_embeddings - empty).flatten()
    cosine = float(torch.nn.functional.cosine_similarity(moved_full, moved_mixed, dim=0))
    assert cosine > 0.9


def test_true_half_precision_is_refused(independent_pipeline):
    with pytest.raises(ValueError, match="precision 'bf16-true' is not supported"):
        nti.invert(independent_pipeline, random_image(0), "x", num_inference_steps=2, num_inner_steps=1,
                   precision="bf16-true")
