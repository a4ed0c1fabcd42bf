"""Pictures of an edit: the labelled comparison grid and the per-token cross-attention maps.

`cross_attention_picture` is the Prompt-to-Prompt figure of a prompt's cross-attention: for each
token, its map averaged over the sampling steps and over every head of the down and up blocks'
cross-attention layers at one resolution (16x16 for SD 1.x at 512 px, the coarsest kept; see
`nti_lightning.editing.blend`), drawn as a labelled grayscale heatmap.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import PreTrainedTokenizerBase

from nti_lightning.editing.attention import AttentionStore
from nti_lightning.editing.blend import BLEND_PLACES

#: Height of the label strip under each picture, in pixels.
LABEL_HEIGHT = 16
#: Pictures smaller than this are enlarged (nearest neighbour) so that labels fit under them.
MIN_CELL = 128
#: White space between pictures, in pixels.
GAP = 4


def token_attention_maps(
    store: AttentionStore,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    prompt_index: int = 0,
    resolution: Optional[int] = None,
) -> tuple[list[str], torch.Tensor]:
    """The prompt's tokens and their `[n, r, r]` cross-attention maps (start/end tokens left out).

    Args:
        store (`AttentionStore`): the store of a finished `edit`.
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        prompt (`str`): the prompt at `prompt_index` of that edit.
        prompt_index (`int`, defaults to 0): which prompt of the batch (0 is the source).
        resolution (`int`, *optional*): side of the maps; defaults to the coarsest kept down/up one.
    """
    if resolution is None:
        available = store.resolutions(BLEND_PLACES)
        if not available:
            raise ValueError("the attention store holds no down/up cross-attention maps (was it passed to edit?)")
        resolution = available[0]
    maps = store.maps(resolution, BLEND_PLACES, is_cross=True)[prompt_index]  # [r, r, K]
    ids = list(tokenizer(prompt).input_ids)[1:-1][: maps.shape[-1] - 2]
    labels = [tokenizer.decode([token]).strip() for token in ids]
    return labels, maps[..., 1 : 1 + len(ids)].permute(2, 0, 1).cpu()


def cross_attention_picture(
    store: AttentionStore,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    prompt_index: int = 0,
    resolution: Optional[int] = None,
    cell: int = 128,
    columns: int = 8,
) -> Image.Image:
    """One grayscale heatmap per token of `prompt`, each stretched to its own range, labelled.

    The authors divide each map by its maximum; stretching from the minimum looks the same for
    trained models (whose maps start near 0) and still shows the nearly flat maps of a random one.

    Args:
        store (`AttentionStore`), tokenizer, prompt, prompt_index, resolution: see `token_attention_maps`.
        cell (`int`, defaults to 128): side of each heatmap in pixels.
        columns (`int`, defaults to 8): heatmaps per row.
    """
    labels, maps = token_attention_maps(store, tokenizer, prompt, prompt_index, resolution)
    tiles = []
    for token_map in maps:
        low = token_map.min()
        scaled = (token_map - low) / (token_map.max() - low).clamp_min(torch.finfo(token_map.dtype).tiny)
        pixels = (scaled * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        tiles.append(Image.fromarray(pixels, mode="L").convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC))
    return labelled_grid(tiles, labels, columns=min(columns, len(tiles)))


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: Optional[int] = None) -> Image.Image:
    """Images side by side (wrapping after `columns`), each with its label underneath.

    Args:
        images (`Sequence[PIL.Image]`): same-size RGB images; small ones are enlarged to 128 px.
        labels (`Sequence[str]`): one label per image, cut to fit its width.
        columns (`int`, *optional*): images per row; defaults to all in one row.
    """
    if not images:
        raise ValueError("nothing to draw")
    width, height = images[0].size
    scale = max(1, -(-MIN_CELL // max(width, height)))
    width, height = width * scale, height * scale
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    step_x, step_y = width + GAP, height + LABEL_HEIGHT + GAP
    grid = Image.new("RGB", (columns * step_x - GAP, rows * step_y - GAP), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for index, (image, label) in enumerate(zip(images, labels)):
        left, top = (index % columns) * step_x, (index // columns) * step_y
        grid.paste(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST), (left, top))
        text = _fit(draw, label, font, width - 4)
        draw.text((left + 2, top + height + 2), text, fill="black", font=font)
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text`, shortened with an ellipsis until it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
