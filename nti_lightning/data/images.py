"""Reading images as the model expects them: RGB, centre-cropped square, model resolution, [-1, 1].

Real photos come as RGBA, palette, grayscale or 16-bit files, in any aspect ratio; all of them
are converted here, and a file that cannot be read is reported by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nti_lightning.errors import NtiError

#: Smallest image side accepted: anything smaller is a thumbnail or a broken file, not a photo.
MIN_SIDE = 8


class ImageError(NtiError, ValueError):
    """An input image is missing, unreadable or unusable; the message names the file."""


def open_image(path: str | Path) -> Image.Image:
    """Reads `path` as an 8-bit RGB image (EXIF orientation applied)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: not a readable image ({error})") from error
    if min(image.width, image.height) < MIN_SIDE:
        raise ImageError(f"{path}: degenerate image ({image.width}x{image.height} px; at least {MIN_SIDE} px a side)")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha is composited on white, 16-bit and float data are rescaled to 0-255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        if image.mode == "F":
            scale = 1.0 if data.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(data / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of `image`, resized to `size` x `size`."""
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """`[3, H, W]` fp32 in [-1, 1] from an RGB image."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """An RGB image from `[3, H, W]` pixels in [0, 1]."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def prepare(image: Image.Image | str | Path, size: int) -> torch.Tensor:
    """A file path or PIL image as a `[3, size, size]` model input in [-1, 1]."""
    if not isinstance(image, Image.Image):
        image = open_image(image)
    return to_tensor(center_square(to_rgb(image), size))
