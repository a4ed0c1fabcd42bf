"""PIE-Bench's masks and metrics against the evaluator's formulas written out in tests/bench_reference.py.

The networks are small random-weight models built from configs (no pretrained weights here): a
ViT with 8-px patches for the structure distance, a CLIP for the CLIP similarities. Tolerances are
float32 rounding: the package computes in float32 as the evaluator does, the reference in float64.
"""

from __future__ import annotations

import math

import bench_reference as ref
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from nti_lightning.bench import metrics
from nti_lightning.bench.weights import BenchNetworks, load_dino, load_networks
from nti_lightning.data import pie_masks as masks
from nti_lightning.errors import BenchmarkError, NtiError
from nti_lightning.models.tokenizer import clip_tokenizer


def image(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth-ish random RGB image (noise on a gradient), so SSIM and PSNR are not degenerate."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.linspace(0, 200, h * w).reshape(h, w)[..., None] + rng.integers(0, 55, (h, w, 3))
    return base.astype(np.uint8)


def edited(source: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(source.astype(int) + rng.integers(-30, 31, source.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- masks


def test_decode_sets_runs_and_the_border():
    mask = masks.decode_mask([7, 3, 30, 2], (6, 8))
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected.flat[7:10] = 1  # row 0 col 7, then wraps to row 1 cols 0-1
    expected.flat[30:32] = 1
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1
    assert mask.dtype == np.uint8 and mask.shape == (6, 8)
    np.testing.assert_array_equal(mask, expected)
    # An interior run away from the border: only it and the border are set.
    inner = masks.decode_mask([19, 2], (6, 8))
    assert inner[2, 3] == inner[2, 4] == 1 and inner[2, 2] == inner[2, 5] == 0
    assert inner[1:-1, 1:-1].sum() == 2


def test_decode_cuts_a_run_at_the_end_and_matches_the_evaluator_loop():
    runs = [60, 1000, 9, 4, 9, 2]  # a run far past the end, and overlapping runs
    mask = masks.decode_mask(runs, (8, 8))
    assert mask.reshape(-1)[60:].all()
    np.testing.assert_array_equal(mask, ref.decode(runs, 8, 8))
    rng = np.random.default_rng(0)
    for _ in range(20):
        runs = []
        for _ in range(rng.integers(0, 6)):
            runs += [int(rng.integers(0, 120)), int(rng.integers(0, 40))]
        np.testing.assert_array_equal(masks.decode_mask(runs, (10, 12)), ref.decode(runs, 10, 12))


def test_default_size_is_pie_benchs():
    assert masks.decode_mask([0, 5]).shape == (512, 512)


def test_encode_round_trip():
    rng = np.random.default_rng(1)
    mask = (rng.random((9, 11)) < 0.4).astype(np.uint8)
    runs = masks.encode_mask(mask)
    assert all(isinstance(v, int) for v in runs) and len(runs) % 2 == 0
    bordered = mask.copy()
    bordered[0, :] = bordered[-1, :] = bordered[:, 0] = bordered[:, -1] = 1
    np.testing.assert_array_equal(masks.decode_mask(runs, mask.shape), bordered)
    # A decoded mask (border set) survives exactly, and runs span row ends.
    assert masks.encode_mask(bordered) == masks.encode_mask(masks.decode_mask(masks.encode_mask(bordered), (9, 11)))
    assert masks.encode_mask(np.array([[0, 1, 1], [1, 0, 0]])) == [1, 3]
    assert masks.encode_mask(np.zeros((3, 3))) == []


@pytest.mark.parametrize(
    "runs, phrase",
    [
        ([1, 2, 3], "3 entries"),
        ([-1, 2], "starts at -1"),
        ([64, 2], "starts at 64"),
        ([3, -2], "negative length"),
        ([1.5, 2], "integers"),
    ],
)
def test_decode_errors_name_the_sample(runs, phrase):
    with pytest.raises(BenchmarkError) as error:
        masks.decode_mask(runs, (8, 8), sample="111000000000")
    assert "111000000000" in str(error.value) and phrase in str(error.value)
    assert isinstance(error.value, NtiError)


# --------------------------------------------------------------------------- pixel metrics


@pytest.fixture
def pair():
    source = image(0)
    edit = edited(source, 1)
    mask = masks.decode_mask([5 * 40 + 8, 20, 12 * 40 + 3, 150], (48, 40))
    return source, edit, mask


def test_mse_and_psnr_on_the_unedited_region(pair):
    source, edit, mask = pair
    assert metrics.mse_unedited(source, edit, mask) == pytest.approx(ref.mse(source, edit, mask), rel=1e-5)
    assert metrics.psnr_unedited(source, edit, mask) == pytest.approx(ref.psnr(source, edit, mask), abs=1e-4)
    # Only the unedited region counts: changing the masked pixels changes nothing.
    changed = edit.copy()
    changed[mask > 0] = 255 - changed[mask > 0]
    assert metrics.mse_unedited(source, changed, mask) == metrics.mse_unedited(source, edit, mask)


def test_ssim_is_the_mean_over_windows_inside_the_image(pair):
    # SSIM's variances are float32 differences E[x^2] - mu^2 that cancel: agreement to ~1e-5.
    source, edit, mask = pair
    assert metrics.ssim_unedited(source, edit, mask) == pytest.approx(ref.ssim(source, edit, mask), abs=2e-5)
    no_mask = np.zeros((48, 40))
    assert metrics.ssim_unedited(source, edit, no_mask) == pytest.approx(ref.ssim(source, edit, no_mask), abs=2e-5)
    assert metrics.ssim_unedited(source, source, mask) == pytest.approx(1.0, abs=1e-6)


def test_whole_image_mask_gives_nan(pair):
    source, edit, _ = pair
    full = masks.decode_mask([0, 48 * 40], (48, 40))
    for fn in (metrics.psnr_unedited, metrics.mse_unedited, metrics.ssim_unedited):
        assert math.isnan(fn(source, edit, full))
    assert math.isnan(metrics.lpips_unedited(lambda a, b: 0.0, source, edit, full))


def test_lpips_gets_the_masked_images_in_minus_one_to_one(pair):
    source, edit, mask = pair
    seen = []

    def fake_lpips(a, b):
        seen.append((a, b))
        return (a - b).abs().mean()

    value = metrics.lpips_unedited(fake_lpips, source, edit, mask)
    a, b = seen[0]
    assert a.shape == (1, 3, 48, 40) and a.dtype == torch.float32
    np.testing.assert_allclose(a[0].permute(1, 2, 0).double().numpy(), ref.masked(source, mask) * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(b[0].permute(1, 2, 0).double().numpy(), ref.masked(edit, mask) * 2 - 1, atol=1e-6)
    assert value == pytest.approx(np.abs(ref.masked(source, mask) - ref.masked(edit, mask)).mean() * 2, rel=1e-5)


# --------------------------------------------------------------------------- structure distance


def small_vit(seed: int = 0, eps: float = 1e-6) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       patch_size=8, image_size=224, layer_norm_eps=eps)
    model = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # the initialiser's 0.02-scale weights make every key alike; spread them
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("size, expected", [((512, 512), (224, 224)), ((64, 160), (192, 480)),
                                            ((300, 200), (336, 224)), ((100, 400), (120, 480))])
def test_resize_rule(size, expected):
    assert metrics.resized_size(*size) == expected


@pytest.mark.parametrize("side", [64, 320])  # upscaled, and downscaled (no antialias)
def test_dino_input_is_bilinear_then_normalised_on_0_255(side):
    source = image(3, (side, side))
    ours = metrics.dino_input(source)[0].double().numpy()
    assert ours.shape == (3, 224, 224)
    # Values reach ~1100 (0-255 over std ~0.23); 5e-3 is float32 rounding of the weights.
    np.testing.assert_allclose(ours, ref.dino_input(source), rtol=0, atol=5e-3)


def test_dino_keys_are_the_last_blocks_key_projection():
    model = small_vit()
    pixels = metrics.dino_input(image(4, (64, 64)))
    keys = metrics.dino_keys(model, pixels)
    assert keys.shape == (1 + 28 * 28, 32)
    expected = ref.vit_keys(model, pixels[0].double().numpy(), layer=1, eps=1e-6)
    torch.testing.assert_close(keys.double(), expected, rtol=1e-4, atol=1e-4)
    first = ref.vit_keys(model, pixels[0].double().numpy(), layer=0, eps=1e-6)
    torch.testing.assert_close(metrics.dino_keys(model, pixels, layer=0).double(), first, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", [64, 256])
def test_structure_distance(side):
    model = small_vit()
    source = image(5, (side, side))
    edit = edited(source, 6)
    ours = metrics.structure_distance(model, source, edit)
    expected = ref.structure_distance(model, source, edit, layer=1, eps=1e-6)
    assert expected > 1e-4
    assert ours == pytest.approx(expected, rel=1e-4)
    assert metrics.structure_distance(model, source, source) == pytest.approx(0.0, abs=1e-9)
    cached = metrics.dino_self_similarity(model, source)
    assert metrics.structure_distance(model, source, edit, source_similarity=cached) == ours


def test_keys_self_similarity_floors_the_norm_product():
    keys = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    sim = metrics.keys_self_similarity(keys)
    assert sim[0, 2].item() == pytest.approx(0.6)
    assert sim[1].abs().sum().item() == 0.0  # a zero key: 0 / eps, not nan


def test_load_dino_sets_dinos_layer_norm_eps(tmp_path):
    small_vit(eps=1e-12).save_pretrained(tmp_path / "dino")
    model = load_dino(str(tmp_path / "dino"))
    assert model.config.layer_norm_eps == 1e-6
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert load_dino(str(tmp_path / "dino"), layer_norm_eps=None).config.layer_norm_eps == 1e-12


# --------------------------------------------------------------------------- CLIP


def small_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def image_processor():
    import transformers

    return (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)()


PROMPTS = ["a cat sitting next to a mirror", "a red apple on a table", "a watercolor painting of a dog",
           "a man wearing a hat"]


def test_clip_similarity_whole_and_edited_region():
    model, tokenizer, processor = small_clip(), clip_tokenizer(), image_processor()
    edit = image(7, (64, 64))
    mask = masks.decode_mask([20 * 64 + 10, 300], (64, 64))
    raws = []
    for flip in (False, True):
        if flip:  # the same model with every cosine negated, to exercise the clamp at 0
            with torch.no_grad():
                model.text_projection.weight.neg_()
        for prompt in PROMPTS:
            text = metrics.clip_text_features(model, tokenizer, prompt)
            for region in (None, mask):
                ours = metrics.clip_similarity(metrics.clip_image_features(model, processor, edit, region), text)
                raw = ref.clip_raw(model, tokenizer, edit, prompt, region)
                raws.append(raw)
                assert ours == pytest.approx(max(raw, 0.0), abs=1e-4)
    assert min(raws) < -1 and max(raws) > 1


def test_brackets_are_stripped():
    assert metrics.strip_brackets("a [red] car on [a] road") == "a red car on a road"


# --------------------------------------------------------------------------- missing weights


def test_missing_weights_are_na_with_reasons_and_the_rest_is_computed(tmp_path, pair):
    networks = load_networks(dino=str(tmp_path / "no-dino"), clip="openai/clip-vit-large-patch14-not-cached",
                             lpips=str(tmp_path / "no-torch-hub"), device="cpu")
    assert networks.dino is None and networks.clip is None and networks.lpips is None
    assert set(networks.unavailable) == {"structure_distance", "lpips_unedited", "clip_whole", "clip_edited"}
    assert "no such folder" in networks.unavailable["structure_distance"]
    assert "clip-vit-large-patch14-not-cached" in networks.unavailable["clip_whole"]
    assert networks.unavailable["lpips_unedited"]  # torchvision missing, or no checkpoint in the folder
    from nti_lightning.bench.score import score_sample

    source, edit, mask = pair
    scores = score_sample(networks, source, edit, mask, "a prompt")
    assert scores["structure_distance"] is None and scores["clip_whole"] is None and scores["lpips_unedited"] is None
    assert scores["psnr_unedited"] == pytest.approx(ref.psnr(source, edit, mask), abs=1e-4)
    assert scores["ssim_unedited"] == pytest.approx(ref.ssim(source, edit, mask), abs=2e-5)
    off = load_networks(dino="none", clip=None, lpips="none", device="cpu")
    assert off.unavailable["structure_distance"].startswith("turned off")


def test_lpips_without_torchvision_says_so():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        networks = load_networks(dino="none", clip="none", lpips="squeeze", device="cpu")
        assert "torchvision" in networks.unavailable["lpips_unedited"]
    else:
        pytest.skip("torchvision is installed")


def test_clip_folder_without_tokenizer_uses_openai_clips(tmp_path):
    small_clip().save_pretrained(tmp_path / "clip")
    networks = load_networks(dino="none", clip=str(tmp_path / "clip"), lpips="none", device="cpu")
    assert networks.clip is not None and "clip_whole" not in networks.unavailable
    assert networks.clip_tokenizer("a cat")["input_ids"] == clip_tokenizer()("a cat")["input_ids"]
    processor = networks.clip_image_processor  # OpenAI CLIP's preprocessing when the folder has none
    assert processor.size["shortest_edge"] == 224 and processor.crop_size["height"] == 224
    assert processor.resample == 3 and tuple(processor.image_mean) == tuple(ref.CLIP_MEAN)  # 3: bicubic
    assert isinstance(networks, BenchNetworks)
