"""LocalBlend: edit only where the chosen words attend, keep the source latent elsewhere.

After each sampling step past the first `start` fraction of the steps, the mask of each prompt
is read off the cross-attention maps of its chosen words, summed over the steps so far, in the
down and up blocks at the blend resolution; max-pooled 3x3, upsampled (nearest) to the latent
size, normalised by its maximum and thresholded. Each edit's mask is the union of its own and the
source's, and the edit latent becomes `x_src + mask (x - x_src)` (the authors' `LocalBlend`).

The authors read the 16x16 maps of SD 1.x at 512 px, which are the coarsest cross-attention maps
of its down and up blocks. By default the blend uses that coarsest resolution whatever the model:
16 for SD 1.x at 512 px, 24 for SD 2.x at 768 px, 32 for SDXL at 1024 px (its attention runs at
64x64 and 32x32 only; 32x32 is the same 1/32 of the image side as SD 1.x's 16x16), 8 for the
tiny test model (whose only down/up cross-attention runs at the latent's own 8x8).

The maths is written once, here (`blend_resolution`, `blend_mask`, `keep_source_outside`): a
`LocalBlend` called on one edit's rows and Prompt-to-Prompt's batched control
(`nti_lightning.editing.batched_control`), which blends every row of a batch at once, both use it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from nti_lightning.editing.alignment import word_positions
from nti_lightning.editing.attention import AttentionStore

#: Places whose maps make the mask (the authors use down and up blocks, not the middle block).
BLEND_PLACES = ("down", "up")


def words_region(
    maps: torch.Tensor, weights: torch.Tensor, threshold: Union[float, torch.Tensor], latent_size: Sequence[int]
) -> torch.Tensor:
    """`[P, 1, h, w]` boolean region of each row's words, before the union with the source's.

    Args:
        maps (`torch.Tensor`): `[P, r, r, K]` cross-attention maps (summed over steps and layers).
        weights (`torch.Tensor`): `[P, K]` 1 on each row's blend words' tokens.
        threshold (`float` or `torch.Tensor`): mask where the peak-normalised map exceeds it; one
            for all rows, or `[P]` per row.
        latent_size (`Sequence[int]`): `(h, w)` of the latents the mask applies to.
    """
    word_maps = (maps * weights[:, None, None, :]).sum(-1)[:, None]  # [P, 1, r, r]
    word_maps = F.max_pool2d(word_maps, kernel_size=3, stride=1, padding=1)
    word_maps = F.interpolate(word_maps, size=tuple(latent_size))
    # A prompt with no words has an all-zero map: keep it all-False rather than 0/0.
    peak = word_maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(word_maps.dtype).tiny)
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.view(-1, 1, 1, 1)
    return word_maps / peak > threshold


def blend_resolution(store: AttentionStore, resolution: Optional[int], max_queries: Optional[int] = None) -> int:
    """The side of the maps a blend reads: its own `resolution`, else the coarsest down/up
    cross-attention maps kept in `store`.

    Args:
        store (`AttentionStore`): the maps recorded so far.
        resolution (`int`, *optional*): the blend's own choice.
        max_queries (`int`, *optional*): only maps of at most this many positions count (the
            bound of the edit's own store, where `store` holds a whole batch's maps and may keep finer ones).

    Raises:
        `ValueError` when `store` holds no such maps.
    """
    if resolution is not None:
        return resolution
    kept = [side for side in store.resolutions(BLEND_PLACES) if max_queries is None or side * side <= max_queries]
    if not kept:
        raise ValueError("LocalBlend found no down/up cross-attention maps in the store")
    return kept[0]


def blend_mask(
    maps: torch.Tensor,
    weights: torch.Tensor,
    threshold: Union[float, torch.Tensor],
    latent_size: Sequence[int],
    source_row: torch.Tensor,
) -> torch.Tensor:
    """`[P, 1, h, w]` boolean mask of each row: its words' region united with its source row's.

    Args:
        maps (`torch.Tensor`): `[P, r, r, K]` cross-attention maps (summed over steps and layers).
        weights (`torch.Tensor`): `[P, K]` 1 on each row's blend words' tokens.
        threshold (`float` or `torch.Tensor`): see `words_region`.
        latent_size (`Sequence[int]`): `(h, w)` of the latents the mask applies to.
        source_row (`torch.Tensor`): `[P]` long, each row's source row (a source row's own index).
    """
    region = words_region(maps, weights, threshold, latent_size)
    return region.index_select(0, source_row) | region


def keep_source_outside(latents: torch.Tensor, mask: torch.Tensor, source_row: torch.Tensor) -> torch.Tensor:
    """`x_src + mask (x - x_src)` for every row: its source row's latent outside its mask.

    Args:
        latents (`torch.Tensor`): `[P, C, h, w]` latents after a step.
        mask (`torch.Tensor`): `[P, 1, h, w]` boolean mask of each row (`blend_mask`).
        source_row (`torch.Tensor`): `[P]` long, each row's source row.
    """
    sources = latents.index_select(0, source_row)
    return sources + mask.to(latents.dtype) * (latents - sources)


class LocalBlend:
    """Restricts an edit to the region of chosen words.

    Args:
        prompts (`Sequence[str]`): the controller's prompts (source first).
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        words (`Sequence[str | Sequence[str]]`): for each prompt, the word (or words) whose region
            may change, e.g. `[["cat"], ["dog"]]` for "a cat on a sofa" -> "a dog on a sofa".
        threshold (`float`, defaults to 0.3): mask where the normalised map exceeds it.
        start (`float`, defaults to 0.2): fraction of the steps before blending begins.
        resolution (`int`, *optional*): side of the maps read; defaults to the coarsest kept down/up
            cross-attention resolution (16 for SD 1.x at 512 px, 32 for SDXL at 1024 px).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        words: Sequence[Union[str, Sequence[str]]],
        threshold: float = 0.3,
        start: float = 0.2,
        resolution: Optional[int] = None,
    ) -> None:
        self.prompts = list(prompts)
        if isinstance(words, str) or len(words) != len(self.prompts):
            raise ValueError(
                f"LocalBlend needs one entry of words per prompt (source first): got {words!r} "
                f"for {len(self.prompts)} prompts"
            )
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"LocalBlend start must be a fraction of the steps, got {start}")
        self.words = [[entry] if isinstance(entry, str) else list(entry) for entry in words]
        self.threshold = threshold
        self.start = start
        self.resolution = resolution
        self.weights = torch.zeros(len(self.prompts), tokenizer.model_max_length)  # [P, K] 1 on blend words
        for index, (prompt, entry) in enumerate(zip(self.prompts, self.words)):
            for word in entry:
                self.weights[index, word_positions(prompt, word, tokenizer)] = 1.0

    def start_step(self, num_steps: int) -> int:
        """First step index blended (the authors' `counter > int(start * T)`)."""
        return int(self.start * num_steps)

    def mask(self, store: AttentionStore, latent_size: Sequence[int]) -> torch.Tensor:
        """`[P, 1, h, w]` boolean region of each prompt (the edits' include the source's)."""
        resolution = blend_resolution(store, self.resolution)
        maps = store.maps(resolution, BLEND_PLACES, is_cross=True, average=False)  # [P, r, r, K]
        weights = self.weights.to(device=maps.device, dtype=maps.dtype)
        source = torch.zeros(maps.shape[0], dtype=torch.long, device=maps.device)  # every prompt's source is prompt 0
        return blend_mask(maps, weights, self.threshold, latent_size, source)

    def __call__(self, latents: torch.Tensor, store: AttentionStore, step: int, num_steps: int) -> torch.Tensor:
        """Latents after step `step` with each edit kept at the source outside its mask."""
        if step < self.start_step(num_steps):
            return latents
        mask = self.mask(store, latents.shape[2:])
        source = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        return keep_source_outside(latents, mask, source)
