"""PIE-Bench's evaluator formulas written out plainly, in float64, for the bench tests.

Nothing here calls the package's code or torchmetrics: the masks are decoded with a per-pixel
loop, PSNR is `10 log10(1 / MSE)`, SSIM slides its hand-built Gaussian window over the image, the
resize is bilinear sampling written out, the ViT's keys come from its weights by matrix products,
and CLIP's preprocessing is PIL's bicubic resize, a centre crop and CLIP's normalisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def decode(runs: list[int], height: int, width: int) -> np.ndarray:
    """The evaluator's loop: each pixel of each run set, cut at the end, then the border."""
    total = height * width
    flat = np.zeros(total)
    for i in range(0, len(runs), 2):
        for j in range(min(runs[i + 1], total - runs[i])):
            flat[runs[i] + j] = 1
    mask = flat.reshape(height, width)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The unedited region in [0, 1]: image / 255 * (1 - mask), float64, (H, W, 3)."""
    return image.astype(np.float64) / 255 * (1 - mask)[..., None]


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if (1 - mask).sum() == 0:
        return math.nan
    return float(np.mean((masked(a, mask) - masked(b, mask)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if (1 - mask).sum() == 0:
        return math.nan
    return 10 * math.log10(1 / mse(a, b, mask))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM over every 11x11 window inside the image, channels averaged (C1, C2 for range 1)."""
    if (1 - mask).sum() == 0:
        return math.nan
    x, y = masked(a, mask), masked(b, mask)
    w = gaussian_window()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(3):
        wx = sliding_window_view(x[..., c], (11, 11))
        wy = sliding_window_view(y[..., c], (11, 11))
        mx = np.einsum("ijkl,kl->ij", wx, w)
        my = np.einsum("ijkl,kl->ij", wy, w)
        vx = np.einsum("ijkl,kl->ij", wx * wx, w) - mx**2
        vy = np.einsum("ijkl,kl->ij", wy * wy, w) - my**2
        cxy = np.einsum("ijkl,kl->ij", wx * wy, w) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resampling of (C, H, W), pixel centres aligned (align_corners=False), no antialias."""
    _, h, w = image.shape

    def coords(n_out: int, n_in: int):
        # The source coordinate in float32, as torch (the evaluator's resize too) computes it: in
        # float64 the weights move by ~1e-5 px at 320 -> 224, i.e. up to 0.01 on 0-255 pixels.
        src = np.maximum(
            (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5), 0
        )
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float64)

    y0, y1, fy = coords(out_h, h)
    x0, x1, fx = coords(out_w, w)
    top = image[:, y0][:, :, x0] * (1 - fx) + image[:, y0][:, :, x1] * fx
    bottom = image[:, y1][:, :, x0] * (1 - fx) + image[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def dino_input(image: np.ndarray, out_h: int = 224, out_w: int = 224) -> np.ndarray:
    """0-255 floats, resized, (x - mean) / std with ImageNet's numbers: (3, h, w) float64."""
    x = image.astype(np.float64).transpose(2, 0, 1)
    if x.shape[1:] != (out_h, out_w):
        x = bilinear(x, out_h, out_w)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def _layer_norm(x: torch.Tensor, module: torch.nn.LayerNorm, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * module.weight.double() + module.bias.double()


def _linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    return x @ module.weight.double().T + module.bias.double()


def _vit_parts(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The Linear layers of a transformers ViT block, under transformers 5's or 4's names."""
    attention = layer.attention
    if hasattr(attention, "k_proj"):
        return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "o": attention.o_proj,
                "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
    return {"q": attention.attention.query, "k": attention.attention.key, "v": attention.attention.value,
            "o": attention.output.dense, "fc1": layer.intermediate.dense, "fc2": layer.output.dense}


@torch.no_grad()
def vit_keys(model: torch.nn.Module, pixels: np.ndarray, layer: int, eps: float) -> torch.Tensor:
    """The keys of block `layer` of a ViTModel for (3, h, w) pixels, by hand, float64: (tokens, hidden)."""
    config = model.config
    p, d, heads = config.patch_size, config.hidden_size, config.num_attention_heads
    x = torch.from_numpy(pixels)
    _, h, w = x.shape
    # Patch embedding: each p x p patch (row-major over the grid) flattened, times the conv's weights.
    patches = x.reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, 3 * p * p)
    conv = model.embeddings.patch_embeddings.projection
    tokens = patches @ conv.weight.double().reshape(d, -1).T + conv.bias.double()
    tokens = (
        torch.cat([model.embeddings.cls_token.double()[0], tokens]) + model.embeddings.position_embeddings.double()[0]
    )
    blocks = getattr(model, "layers", None) or model.encoder.layer
    for index, block in enumerate(blocks):
        parts = _vit_parts(block)
        normed = _layer_norm(tokens, block.layernorm_before, eps)
        if index == layer:
            return _linear(normed, parts["k"])
        q, k, v = (_linear(normed, parts[n]).reshape(-1, heads, d // heads).transpose(0, 1) for n in "qkv")
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), dim=-1) @ v
        tokens = tokens + _linear(attention.transpose(0, 1).reshape(-1, d), parts["o"])
        hidden = _linear(_layer_norm(tokens, block.layernorm_after, eps), parts["fc1"])
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
        tokens = tokens + _linear(hidden, parts["fc2"])
    raise IndexError(layer)


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    unit = keys / keys.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def structure_distance(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, layer: int, eps: float) -> float:
    sa = self_similarity(vit_keys(model, dino_input(a), layer, eps))
    sb = self_similarity(vit_keys(model, dino_input(b), layer, eps))
    return float(((sb - sa) ** 2).mean())


def clip_pixels(image: np.ndarray) -> torch.Tensor:
    """CLIP's preprocessing: bicubic resize of the shorter side to 224, centre crop, normalise."""
    pil = Image.fromarray(image)
    w, h = pil.size
    nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    x = np.asarray(pil.resize((nw, nh), Image.BICUBIC)).astype(np.float64)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    x = (x[top : top + 224, left : left + 224] / 255 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(x.transpose(2, 0, 1)).unsqueeze(0).float()


def clip_raw(model, tokenizer, image: np.ndarray, text: str, mask: np.ndarray | None = None) -> float:
    """100 x cosine of CLIP's image and text embeddings (before the clamp at 0)."""
    if mask is not None:
        image = np.where(mask[..., None] > 0, image, 0).astype(np.uint8)
    with torch.no_grad():
        image_embedding = model.visual_projection(model.vision_model(pixel_values=clip_pixels(image)).pooler_output)
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        text_embedding = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    cos = torch.nn.functional.cosine_similarity(image_embedding.double(), text_embedding.double()).item()
    return 100 * cos


def clip_score(model, tokenizer, image: np.ndarray, text: str, mask: np.ndarray | None = None) -> float:
    return max(clip_raw(model, tokenizer, image, text, mask), 0.0)
