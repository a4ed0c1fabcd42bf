"""The training "data" of Null-text Inversion: batches of images, each walked from timestep T to 1.

Lightning sees one timestep of one image batch as one epoch, and one inner Adam iteration as
one training batch. `PivotWalk` enumerates (image batch, step, iteration) triples; `WalkSampler`
serves the N iterations of the epoch's step, so the walk of batch b, step i is epoch `b·T + i`.
The first item of each image batch carries its pixels and prompts, from which the pivot
trajectory (the targets of the walk) is computed on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from nti_lightning.data.images import prepare


@dataclass(frozen=True)
class ImageSample:
    """One image to invert: its id (artifact name), source prompt and file path or PIL image."""

    id: str
    prompt: str
    image: str | Path | Image.Image


class PivotWalk(Dataset):
    """All (batch, step, iteration) items of the walks of `batches`.

    Args:
        batches (`Sequence[Sequence[ImageSample]]`): the image batches, inverted one after the other.
        num_inference_steps (`int`): T.
        num_inner_steps (`int`): N, the most inner iterations per step.
        resolution (`int`): the model's image side in pixels.
    """

    def __init__(
        self,
        batches: Sequence[Sequence[ImageSample]],
        num_inference_steps: int,
        num_inner_steps: int,
        resolution: int,
    ) -> None:
        self.batches = [list(batch) for batch in batches]
        self.num_inference_steps = num_inference_steps
        self.num_inner_steps = num_inner_steps
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.batches) * self.num_inference_steps * self.num_inner_steps

    def __getitem__(self, index: int) -> dict[str, Any]:
        rest, iteration = divmod(index, self.num_inner_steps)
        batch, step = divmod(rest, self.num_inference_steps)
        item: dict[str, Any] = {"batch": batch, "step": step, "iteration": iteration}
        if step == 0 and iteration == 0:
            samples = self.batches[batch]
            item["ids"] = [sample.id for sample in samples]
            item["prompts"] = [sample.prompt for sample in samples]
            item["pixels"] = torch.stack([prepare(sample.image, self.resolution) for sample in samples])
        return item


class WalkSampler(Sampler[int]):
    """Serves epoch `e` the N iterations of step `e mod T` of image batch `e div T`."""

    def __init__(self, walk: PivotWalk) -> None:
        self.walk = walk
        self.epoch = 0

    @property
    def num_epochs(self) -> int:
        """Epochs needed to walk every batch: one per (batch, timestep)."""
        return len(self.walk.batches) * self.walk.num_inference_steps

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.walk.num_inner_steps

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.walk.num_inner_steps
        return iter(range(start, start + self.walk.num_inner_steps))
