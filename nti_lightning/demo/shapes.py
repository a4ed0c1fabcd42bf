"""Procedural captioned images: one coloured shape on a plain coloured background.

Every sample is a pure function of `(split, index)`: the same pair gives the same image, caption,
shape mask and colours on every machine, so a training run is reproducible from its seed and the
held-out split is a fixed set of images that training never draws (different seed streams).

    >>> sample = make_sample(3, split="heldout")
    >>> sample.caption                      # e.g. "a red circle on a green background"
    >>> sample.image, sample.mask           # 32x32 RGB PIL image, [32, 32] bool numpy mask

Shapes are drawn at `SUPERSAMPLE` times the resolution and box-filtered down, so their edges are
anti-aliased like a photo's rather than stair-stepped; `coverage` keeps the exact fraction of each
pixel the shape covers, `mask` is `coverage >= 0.5`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from nti_lightning.data.images import to_tensor

#: Nominal RGB of the shape colours (each sample is jittered around them).
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
}
#: Nominal RGB of the background colours: the shape colours plus white and black.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    **SHAPE_COLORS,
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
#: Shape names, as they appear in captions.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Splits and the seed stream each one draws from.
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
#: Default image side in pixels.
RESOLUTION = 32
#: Drawing resolution factor (anti-aliasing).
SUPERSAMPLE = 4
#: Bounding-box side of the shapes, in pixels at `RESOLUTION` (inclusive range).
SIZE_RANGE = (12, 22)
#: Largest per-channel jitter of a sample's colours around the nominal ones.
COLOR_JITTER = 15


@dataclass(frozen=True)
class ShapeSample:
    """One generated sample.

    Args:
        image (`PIL.Image.Image`): the RGB image.
        caption (`str`): "a {color} {shape} on a {background} background".
        shape (`str`): one of `SHAPES`.
        color (`str`): the shape's colour name (a key of `SHAPE_COLORS`).
        background (`str`): the background's colour name (a key of `BACKGROUND_COLORS`).
        shape_rgb (`tuple[int, int, int]`): the shape's actual (jittered) colour.
        background_rgb (`tuple[int, int, int]`): the background's actual colour.
        coverage (`np.ndarray`): `[H, W]` float32 fraction of each pixel covered by the shape.
        box (`tuple[int, int, int, int]`): the shape's bounding box (left, top, right, bottom) in
            pixels, right/bottom exclusive.
    """

    image: Image.Image
    caption: str
    shape: str
    color: str
    background: str
    shape_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    coverage: np.ndarray
    box: tuple[int, int, int, int]

    @property
    def mask(self) -> np.ndarray:
        """`[H, W]` bool: pixels at least half covered by the shape."""
        return self.coverage >= 0.5


#: Word positions in a caption of the words that describe the shape ("red", "circle") and the
#: background ("blue", "background"); every caption word is a single CLIP token.
SHAPE_WORDS: tuple[int, ...] = (1, 2)
BACKGROUND_WORDS: tuple[int, ...] = (5, 6)


def caption_for(color: str, shape: str, background: str) -> str:
    """The caption of a sample: "a {color} {shape} on a {background} background"."""
    return f"a {color} {shape} on a {background} background"


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    # Distinct entropy tuples give independent streams: no train sample can equal a held-out one.
    return np.random.default_rng([SPLITS[split], seed, index])


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    values = np.asarray(rgb) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(values, 0, 255))


def draw_shape(
    shape: str,
    box: tuple[int, int, int, int],
    resolution: int = RESOLUTION,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """`[resolution, resolution]` float32 coverage of `shape` filling `box` (pixels, exclusive end).

    Args:
        shape (`str`): "circle", "square" or "triangle" (upright, base at the bottom of the box).
        box (`tuple[int, int, int, int]`): left, top, right, bottom at `resolution`.
        resolution (`int`, defaults to 32): image side in pixels.
        supersample (`int`, defaults to 4): drawing resolution factor.
    """
    size = resolution * supersample
    left, top, right, bottom = (v * supersample for v in box)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    # PIL's boxes include their right/bottom pixel: shapes span [left, right - 1].
    if shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=255)
    elif shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((left + right - 1) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    small = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(
    shape: str,
    shape_rgb: tuple[int, int, int],
    background_rgb: tuple[int, int, int],
    box: tuple[int, int, int, int],
    resolution: int = RESOLUTION,
) -> tuple[Image.Image, np.ndarray]:
    """The image of one shape on a plain background, and its coverage.

    Args:
        shape (`str`): one of `SHAPES`.
        shape_rgb (`tuple[int, int, int]`): the shape's colour.
        background_rgb (`tuple[int, int, int]`): the background's colour.
        box (`tuple[int, int, int, int]`): the shape's bounding box (left, top, right, bottom).
        resolution (`int`, defaults to 32): image side in pixels.
    """
    coverage = draw_shape(shape, box, resolution)
    alpha = coverage[..., None]
    pixels = alpha * np.asarray(shape_rgb, np.float32) + (1 - alpha) * np.asarray(background_rgb, np.float32)
    return Image.fromarray(np.round(pixels).astype(np.uint8)), coverage


def make_sample(index: int, split: str = "train", seed: int = 0, resolution: int = RESOLUTION) -> ShapeSample:
    """The sample number `index` of a split.

    Args:
        index (`int`): position in the split's stream (non-negative).
        split (`str`, defaults to "train"): "train" or "heldout"; the streams never share a sample.
        seed (`int`, defaults to 0): selects another stream of the same split (training runs with
            another seed see other images).
        resolution (`int`, defaults to 32): image side in pixels; shape sizes scale with it.
    """
    rng = _rng(split, index, seed)
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(SHAPE_COLORS)[rng.integers(len(SHAPE_COLORS))]
    backgrounds = [name for name in BACKGROUND_COLORS if name != color]
    background = backgrounds[rng.integers(len(backgrounds))]
    scale = resolution / RESOLUTION
    side = int(round(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1) * scale))
    margin = max(1, int(round(2 * scale)))
    left = int(rng.integers(margin, resolution - margin - side + 1))
    top = int(rng.integers(margin, resolution - margin - side + 1))
    box = (left, top, left + side, top + side)
    shape_rgb = _jitter(SHAPE_COLORS[color], rng)
    background_rgb = _jitter(BACKGROUND_COLORS[background], rng)
    image, coverage = render(shape, shape_rgb, background_rgb, box, resolution)
    return ShapeSample(
        image=image,
        caption=caption_for(color, shape, background),
        shape=shape,
        color=color,
        background=background,
        shape_rgb=shape_rgb,
        background_rgb=background_rgb,
        coverage=coverage,
        box=box,
    )


def heldout_samples(count: int, start: int = 0, resolution: int = RESOLUTION) -> list[ShapeSample]:
    """The held-out samples `start .. start + count - 1` (the same on every machine).

    Args:
        count (`int`): how many samples.
        start (`int`, defaults to 0): index of the first one.
        resolution (`int`, defaults to 32): image side in pixels.
    """
    return [make_sample(start + i, split="heldout", resolution=resolution) for i in range(count)]


class ShapesDataset(Dataset):
    """A map-style dataset over a split: item i is `make_sample(start + i, split, seed)` as tensors.

    Items are `{"pixels": [3, H, W] float32 in [-1, 1], "coverage": [1, H, W] float32 shape
    coverage in [0, 1], "recoloured": [3, H, W] the same picture with the shape in another shape
    colour (only with `recoloured=True`), "caption": str}`.

    Args:
        length (`int`): number of samples (the images are generated on the fly, none are stored).
        split (`str`, defaults to "train"): "train" or "heldout".
        seed (`int`, defaults to 0): the split's stream.
        resolution (`int`, defaults to 32): image side in pixels.
        recoloured (`bool`, defaults to True): also render the recoloured picture (the VAE's
            locality loss needs it; it doubles the cost of an item).
        start (`int`, defaults to 0): index in the stream of item 0 (a later stage of training
            goes on where an earlier one stopped).
    """

    def __init__(
        self,
        length: int,
        split: str = "train",
        seed: int = 0,
        resolution: int = RESOLUTION,
        recoloured: bool = True,
        start: int = 0,
    ) -> None:
        _rng(split, 0, seed)  # validates split and seed now rather than in a worker
        self.length = length
        self.split = split
        self.seed = seed
        self.resolution = resolution
        self.recoloured = recoloured
        self.start = start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        index += self.start
        sample = make_sample(index, self.split, self.seed, self.resolution)
        item = {
            "pixels": to_tensor(sample.image),
            "coverage": torch.from_numpy(sample.coverage)[None],
            "caption": sample.caption,
        }
        if self.recoloured:
            # The recolouring draws from a stream of its own, so the samples stay those of make_sample.
            rng = np.random.default_rng([SPLITS[self.split], self.seed, index, 1])
            others = [name for name in SHAPE_COLORS if name != sample.color]
            other_rgb = _jitter(SHAPE_COLORS[others[rng.integers(len(others))]], rng)
            recoloured, _ = render(sample.shape, other_rgb, sample.background_rgb, sample.box, self.resolution)
            item["recoloured"] = to_tensor(recoloured)
        return item


@dataclass(frozen=True)
class Description:
    """What `describe` reads off an image.

    Args:
        color (`str`): the shape colour (a key of `SHAPE_COLORS`) nearest the foreground's median.
        shape (`str`): "square", "circle" or "triangle", from `fill`.
        background (`str`): the background colour (a key of `BACKGROUND_COLORS`).
        mask (`np.ndarray`): `[H, W]` bool foreground pixels.
        fill (`float`): foreground pixels over the area of their bounding box (square 1, circle
            pi/4, upright triangle 1/2); 0 when no foreground was found.
    """

    color: str
    shape: str
    background: str
    mask: np.ndarray
    fill: float


#: `fill` above which a shape is a square, then a circle; below both it is a triangle.
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.64
#: Smallest RGB distance from the background that can count as foreground (0-255 scale).
MIN_CONTRAST = 60.0


def describe(image: Image.Image | np.ndarray) -> Description:
    """Reads the shape, its colour and the background colour off an image, with plain pixel rules.

    The background colour is the median of the border pixels; foreground pixels are those at least
    `MIN_CONTRAST` away from it and closer to the foreground colour (the median of the clearly
    foreground pixels) than to the background. The shape is told by how much of its bounding box
    it fills. Meant for images like `make_sample`'s (one axis-aligned shape, plain background).

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): RGB, or `[H, W, 3]` values in 0-255.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    if distance.max() < MIN_CONTRAST:
        return Description(color="none", shape="none", background=background, mask=distance < 0, fill=0.0)
    # The clearly-foreground pixels give the colour; the mask is then "nearer it than the background".
    core = distance >= max(MIN_CONTRAST, 0.75 * distance.max())
    foreground_rgb = np.median(pixels[core], axis=0)
    mask = (np.linalg.norm(pixels - foreground_rgb, axis=-1) < distance) & (distance >= MIN_CONTRAST / 2)
    rows, cols = np.nonzero(mask)
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(mask.sum() / area)
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return Description(
        color=nearest_color(foreground_rgb, SHAPE_COLORS), shape=shape, background=background, mask=mask, fill=fill
    )


def nearest_color(rgb: np.ndarray, palette: Optional[dict[str, tuple[int, int, int]]] = None) -> str:
    """The name of the palette colour closest (Euclidean RGB) to `rgb`.

    Args:
        rgb (`np.ndarray`): a colour, 0-255.
        palette (`dict[str, tuple[int, int, int]]`, *optional*): defaults to `BACKGROUND_COLORS`.
    """
    palette = palette or BACKGROUND_COLORS
    names = list(palette)
    distances = np.linalg.norm(
        np.asarray([palette[n] for n in names], np.float32) - np.asarray(rgb, np.float32), axis=1
    )
    return names[int(distances.argmin())]
