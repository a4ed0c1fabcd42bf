"""PIE-Bench's metrics, computed as the benchmark's evaluator computes them.

The evaluator (PnPInversion's `evaluation/matrics_calculator.py` and `evaluate.py`) scores an edit
against its source image with seven numbers; docs/PIE_BENCH.md gives their definitions and the
places where this module follows its code rather than the paper's text. In short:

* structure distance: DINO ViT-B/8's keys of the last block (CLS token included), their cosine
  self-similarity matrix, and the mean squared difference between source and edit;
* PSNR, LPIPS, MSE and SSIM of the unedited region: both images multiplied by `1 - mask`, then
  the whole-image metric, the zeroed pixels included; `nan` when the mask covers everything;
* CLIP similarity of the edit to the editing prompt, whole and edited region only.

Images are (height, width, 3) `uint8` arrays or PIL images, as the evaluator reads them with
`np.array(Image.open(...))`; masks are (height, width) 0/1 arrays (`masks.decode_mask`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from nti_lightning.data.pie_bench import strip_brackets  # noqa: F401  (re-exported: the evaluator strips prompts so)

#: The metrics, in the order of the paper's table (and of the CSV's columns).
METRICS = (
    "structure_distance",
    "psnr_unedited",
    "lpips_unedited",
    "mse_unedited",
    "ssim_unedited",
    "clip_whole",
    "clip_edited",
)

#: ImageNet's mean and standard deviation, applied by the evaluator to 0-255 values (sic).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[np.ndarray, Image.Image]


def as_array(image: ImageLike) -> np.ndarray:
    """A (height, width, 3) `uint8` array of `image` (a PIL image is converted to RGB first).

    Args:
        image (`np.ndarray` or `PIL.Image.Image`): an RGB image.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a (height, width, 3) uint8 image, got {image.dtype} {image.shape}")
    return image


# --------------------------------------------------------------------------- unedited region


def _unedited(image: ImageLike, mask: np.ndarray, device: Union[str, torch.device, None]) -> torch.Tensor:
    """`image / 255 * (1 - mask)` as a float32 (1, 3, H, W) tensor, in the evaluator's order of
    operations (divide, then multiply, both in float32), so the values match bit for bit."""
    pixels = torch.from_numpy(as_array(image).astype(np.float32) / 255)
    keep = torch.from_numpy(1 - np.asarray(mask, dtype=np.float32))
    return (pixels * keep[..., None]).permute(2, 0, 1).unsqueeze(0).contiguous().to(device)


def has_unedited_region(mask: np.ndarray) -> bool:
    """Whether `1 - mask` keeps any pixel; when not, the unedited-region metrics are `nan`.

    Args:
        mask (`np.ndarray`): (height, width) 0/1, 1 = edited region.
    """
    return bool((1 - np.asarray(mask, dtype=np.float64)).sum() != 0)


def mse_unedited(source: ImageLike, edit: ImageLike, mask: np.ndarray, device: Optional[str] = None) -> float:
    """Mean squared error over every element of the masked images in [0, 1] (`MeanSquaredError`).

    Args:
        source (`np.ndarray` or `PIL.Image.Image`): the source image.
        edit (`np.ndarray` or `PIL.Image.Image`): the edited image, of the source's size.
        mask (`np.ndarray`): (height, width) 0/1, 1 = edited region.
        device (`str`, *optional*): where to compute; the CPU by default.

    Returns:
        `float`: the MSE, or `nan` when the mask covers the whole image.
    """
    if not has_unedited_region(mask):
        return math.nan
    a, b = _unedited(source, mask, device), _unedited(edit, mask, device)
    return mean_squared_error(a, b).item()


def psnr_unedited(source: ImageLike, edit: ImageLike, mask: np.ndarray, device: Optional[str] = None) -> float:
    """PSNR of the masked images in [0, 1]: `10 log10(1 / MSE)` (`PeakSignalNoiseRatio(data_range=1.0)`).

    Args:
        source (`np.ndarray` or `PIL.Image.Image`): the source image.
        edit (`np.ndarray` or `PIL.Image.Image`): the edited image, of the source's size.
        mask (`np.ndarray`): (height, width) 0/1, 1 = edited region.
        device (`str`, *optional*): where to compute; the CPU by default.

    Returns:
        `float`: in dB; `nan` when the mask covers the whole image, `inf` for identical
        unedited regions.
    """
    if not has_unedited_region(mask):
        return math.nan
    a, b = _unedited(source, mask, device), _unedited(edit, mask, device)
    return peak_signal_noise_ratio(a, b, data_range=1.0).item()


def ssim_unedited(source: ImageLike, edit: ImageLike, mask: np.ndarray, device: Optional[str] = None,
                  sigma: float = 1.5) -> float:
    """SSIM of the masked images in [0, 1], Gaussian window (sigma 1.5, 11 taps), K1 0.01, K2 0.03.

    The mean is over the windows that lie inside the image, the SSIM map without its 5-pixel
    edge: what torchmetrics' `StructuralSimilarityIndexMeasure(data_range=1.0)` returned when the
    benchmark was published. Releases from late 2024 on (Lightning-AI/torchmetrics#2721) also
    average the edge windows, which reach into a reflected copy of the image; the map is taken
    from torchmetrics and cropped here, so the result is the published one whichever release is
    installed.

    Args:
        source (`np.ndarray` or `PIL.Image.Image`): the source image.
        edit (`np.ndarray` or `PIL.Image.Image`): the edited image, of the source's size.
        mask (`np.ndarray`): (height, width) 0/1, 1 = edited region.
        device (`str`, *optional*): where to compute; the CPU by default.
        sigma (`float`, defaults to 1.5): the Gaussian window's standard deviation (its width is
            `2 * int(3.5 * sigma + 0.5) + 1` taps, 11 for 1.5).

    Returns:
        `float`: the mean SSIM; `nan` when the mask covers the whole image.
    """
    if not has_unedited_region(mask):
        return math.nan
    a, b = _unedited(source, mask, device), _unedited(edit, mask, device)
    _, full = structural_similarity_index_measure(a, b, sigma=sigma, data_range=1.0, return_full_image=True)
    pad = int(3.5 * sigma + 0.5)  # torchmetrics' window is 2 * pad + 1 taps wide
    return full[..., pad:-pad, pad:-pad].mean().item()


def lpips_unedited(lpips: torch.nn.Module, source: ImageLike, edit: ImageLike, mask: np.ndarray,
                   device: Optional[str] = None) -> float:
    """LPIPS (SqueezeNet) of the masked images, given to the network in [-1, 1] (`x * 2 - 1`).

    Args:
        lpips (`torch.nn.Module`): torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`
            (see `weights.load_lpips`), or any module taking two (1, 3, H, W) images in [-1, 1].
        source (`np.ndarray` or `PIL.Image.Image`): the source image.
        edit (`np.ndarray` or `PIL.Image.Image`): the edited image, of the source's size.
        mask (`np.ndarray`): (height, width) 0/1, 1 = edited region.
        device (`str`, *optional*): where to compute; the CPU by default.

    Returns:
        `float`: the distance, or `nan` when the mask covers the whole image.
    """
    if not has_unedited_region(mask):
        return math.nan
    a, b = _unedited(source, mask, device), _unedited(edit, mask, device)
    with torch.no_grad():
        return float(lpips(a * 2 - 1, b * 2 - 1))


# --------------------------------------------------------------------------- structure distance


def resized_size(height: int, width: int, size: int = 224, max_size: Optional[int] = 480) -> tuple[int, int]:
    """torchvision's `Resize(size, max_size=max_size)` output size for an image of `height` x `width`.

    The shorter side becomes `size` and the longer one keeps the aspect ratio (rounded down);
    when that makes the longer side exceed `max_size`, the longer side becomes `max_size` instead.

    Args:
        height (`int`): the image's height.
        width (`int`): the image's width.
        size (`int`, defaults to 224): the shorter side after resizing.
        max_size (`int`, *optional*, defaults to 480): the longest the longer side may become.

    Returns:
        `tuple[int, int]`: (new height, new width).
    """
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def dino_input(image: ImageLike, size: int = 224, max_size: Optional[int] = 480, antialias: bool = False,
               device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The evaluator's DINO input: 0-255 floats, resized, then ImageNet-normalised.

    The evaluator does not divide by 255 before `Normalize`, so the network sees values around
    +-1000; that is part of the published metric and is kept.

    Args:
        image (`np.ndarray` or `PIL.Image.Image`): an RGB image.
        size (`int`, defaults to 224): the shorter side after resizing.
        max_size (`int`, *optional*, defaults to 480): the longest the longer side may become.
        antialias (`bool`, defaults to `False`): the evaluator resizes a tensor with torchvision
            0.13 (the version its README installs), whose tensor `Resize` does not antialias;
            torchvision 0.17 and later antialias by default.
        device (`str` or `torch.device`, *optional*): where the tensor goes.

    Returns:
        `torch.Tensor`: (1, 3, h, w) float32.
    """
    pixels = torch.from_numpy(as_array(image).astype(np.float32)).permute(2, 0, 1).unsqueeze(0).to(device)
    height, width = pixels.shape[-2:]
    new = resized_size(height, width, size, max_size)
    if new != (height, width):  # torchvision returns the image untouched when no resize is needed
        pixels = F.interpolate(pixels, size=new, mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _vit_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a transformers `ViTModel` (`layers` from transformers 5,
    `encoder.layer` before)."""
    blocks = getattr(model, "layers", None)
    return blocks if blocks is not None else model.encoder.layer


def _key_projection(block: torch.nn.Module) -> torch.nn.Module:
    """The key `Linear` of a ViT block (`attention.k_proj`, or `attention.attention.key` before
    transformers 5): DINO's fused `qkv` split, so its output is DINO's keys, bias included."""
    attention = block.attention
    projection = getattr(attention, "k_proj", None)
    return projection if projection is not None else attention.attention.key


def dino_keys(model: torch.nn.Module, pixel_values: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
    """The keys of one block for one image, every head concatenated, CLS token first.

    Args:
        model (`transformers.ViTModel`): DINO ViT-B/8 in transformers form (or any `ViTModel`).
        pixel_values (`torch.Tensor`): (1, 3, h, w), from `dino_input`.
        layer (`int`, *optional*): the block; the last by default (block 11 of ViT-B/8, the
            evaluator's `layer_num=11`).

    Returns:
        `torch.Tensor`: (tokens, hidden) float, tokens = 1 + (h // patch) * (w // patch).
    """
    blocks = _vit_blocks(model)
    block = blocks[len(blocks) - 1 if layer is None else layer]
    captured: list[torch.Tensor] = []
    handle = _key_projection(block).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            # Interpolating the position embeddings is a no-op at the pretraining size (224 px,
            # square); other sizes need it (DINO's own interpolation differs slightly there).
            model(pixel_values=pixel_values.to(model.dtype), interpolate_pos_encoding=True)
    finally:
        handle.remove()
    return captured[0][0]


def keys_self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every token's key with every other's: (tokens, tokens).

    Args:
        keys (`torch.Tensor`): (tokens, dim).
        eps (`float`, defaults to 1e-8): the floor of the product of two norms (the evaluator's).
    """
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(norms @ norms.T, min=eps)


def dino_self_similarity(model: torch.nn.Module, image: ImageLike, layer: Optional[int] = None,
                         antialias: bool = False) -> torch.Tensor:
    """`keys_self_similarity` of `dino_keys` of `dino_input(image)`, on the model's device.

    Args:
        model (`transformers.ViTModel`): the DINO network.
        image (`np.ndarray` or `PIL.Image.Image`): an RGB image.
        layer (`int`, *optional*): as `dino_keys`.
        antialias (`bool`, defaults to `False`): as `dino_input`.
    """
    device = next(model.parameters()).device
    return keys_self_similarity(dino_keys(model, dino_input(image, antialias=antialias, device=device), layer))


def structure_distance(model: torch.nn.Module, source: ImageLike, edit: ImageLike, layer: Optional[int] = None,
                       antialias: bool = False, source_similarity: Optional[torch.Tensor] = None) -> float:
    """Mean squared difference of the DINO key self-similarities of the edit and the source.

    Args:
        model (`transformers.ViTModel`): the DINO network.
        source (`np.ndarray` or `PIL.Image.Image`): the source image.
        edit (`np.ndarray` or `PIL.Image.Image`): the edited image.
        layer (`int`, *optional*): as `dino_keys`.
        antialias (`bool`, defaults to `False`): as `dino_input`.
        source_similarity (`torch.Tensor`, *optional*): the source's `dino_self_similarity`,
            when already computed (one source is scored against several methods' edits).
    """
    if source_similarity is None:
        source_similarity = dino_self_similarity(model, source, layer, antialias)
    edit_similarity = dino_self_similarity(model, edit, layer, antialias)
    return F.mse_loss(edit_similarity, source_similarity).item()


# --------------------------------------------------------------------------- CLIP


def _features(output: Any) -> torch.Tensor:
    """`get_image_features`/`get_text_features` give a tensor before transformers 5 and an
    output object holding it as `pooler_output` from 5 on."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_text_features(model: torch.nn.Module, tokenizer: Any, text: str) -> torch.Tensor:
    """CLIP's unit-norm text embedding of `text`: (1, dim).

    Tokenised as torchmetrics' `CLIPScore` does (padding to the longest, no truncation by the
    tokenizer, then cut to the model's `max_position_embeddings`).

    Args:
        model (`transformers.CLIPModel`): the CLIP model.
        tokenizer (`transformers.CLIPTokenizer`): its tokenizer.
        text (`str`): the prompt.
    """
    tokens = tokenizer([text], padding=True, return_tensors="pt")
    limit = model.config.text_config.max_position_embeddings
    device = next(model.parameters()).device
    with torch.no_grad():
        features = _features(model.get_text_features(tokens["input_ids"][..., :limit].to(device),
                                                     tokens["attention_mask"][..., :limit].to(device)))
    return features / features.norm(p=2, dim=-1, keepdim=True)


def clip_image_features(model: torch.nn.Module, image_processor: Any, image: ImageLike,
                        mask: Optional[np.ndarray] = None) -> torch.Tensor:
    """CLIP's unit-norm image embedding: (1, dim).

    Args:
        model (`transformers.CLIPModel`): the CLIP model.
        image_processor (`transformers.CLIPImageProcessor`): its PIL-based image processor (the
            one the evaluator's transformers used: bicubic resize of the shorter side to 224,
            centre crop, CLIP normalisation).
        image (`np.ndarray` or `PIL.Image.Image`): an RGB image.
        mask (`np.ndarray`, *optional*): (height, width) 0/1; when given the image is
            `uint8(image * mask)`, only the edited region (and the border) left.
    """
    pixels = as_array(image)
    if mask is not None:
        pixels = (pixels * np.asarray(mask)[..., None]).astype(np.uint8)
    # The evaluator hands the processor a (3, H, W) uint8 tensor; so do we.
    chw = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only
    processed = image_processor(images=[chw], return_tensors="pt")
    device = next(model.parameters()).device
    with torch.no_grad():
        features = _features(model.get_image_features(processed["pixel_values"].to(device, model.dtype)))
    return features / features.norm(p=2, dim=-1, keepdim=True)


def clip_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """torchmetrics' CLIP score of unit-norm features: `max(100 * cos, 0)`.

    Args:
        image_features (`torch.Tensor`): (1, dim), from `clip_image_features`.
        text_features (`torch.Tensor`): (1, dim), from `clip_text_features`.
    """
    score = 100 * (image_features * text_features.to(image_features.device)).sum(dim=-1)
    return torch.clamp(score.mean(), min=0).item()
