"""The training "data" of Null-text Inversion: batches of images, each walked from timestep T to 1.

Lightning sees one timestep of one image batch as one epoch, and one inner Adam iteration as
one training batch. `PivotWalk` enumerates (image batch, step, iteration) triples; `WalkSampler`
serves the N iterations of the epoch's step, so the walk of batch b, step i is epoch `b·T + i`.
The first item of each image batch carries its pixels and prompts, from which the pivot
trajectory (the targets of the walk) is computed on the model's device. An empty batch (a rank
with fewer batches than the others) walks its epochs without doing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from nti_lightning.data.images import ImageError, prepare


@dataclass  # not frozen: Lightning rebuilds dataclasses in a batch when moving it to the device
class ImageSample:
    """One image to invert: its id (artifact name), source prompt, file path or PIL image, and
    the edits a manifest lists for it (kept in the artifact's metadata)."""

    id: str
    prompt: str
    image: str | Path | Image.Image
    edits: Any = None


class PivotWalk(Dataset):
    """All (batch, step, iteration) items of the walks of `batches`.

    Every batch fills `slots` places: images past the end of a short batch, and images that
    turn out unreadable when decoded, leave their place empty (zero pixels, `valid` False), so
    the null embedding keeps one shape for the whole run (DDP, CUDA graphs) and no image is
    ever added twice to fill a batch.

    Args:
        batches (`Sequence[Sequence[ImageSample]]`): the image batches, inverted one after the other.
        num_inference_steps (`int`): T.
        num_inner_steps (`int`): N, the most inner iterations per step.
        resolution (`int`): the model's image side in pixels.
        slots (`int`, *optional*): places per batch; defaults to the longest batch.
        strict (`bool`, defaults to False): raise on an unreadable image instead of reporting it
            in the item's "failed" list.
    """

    def __init__(
        self,
        batches: Sequence[Sequence[ImageSample]],
        num_inference_steps: int,
        num_inner_steps: int,
        resolution: int,
        slots: Optional[int] = None,
        strict: bool = False,
    ) -> None:
        self.batches = [list(batch) for batch in batches]
        self.num_inference_steps = num_inference_steps
        self.num_inner_steps = num_inner_steps
        self.resolution = resolution
        self.slots = slots or max((len(batch) for batch in self.batches), default=1)
        self.strict = strict

    def __len__(self) -> int:
        return len(self.batches) * self.num_inference_steps * self.num_inner_steps

    def __getitem__(self, index: int) -> dict[str, Any]:
        rest, iteration = divmod(index, self.num_inner_steps)
        batch, step = divmod(rest, self.num_inference_steps)
        item: dict[str, Any] = {"batch": batch, "step": step, "iteration": iteration}
        if step == 0 and iteration == 0:
            item.update(self.load(self.batches[batch]))
        return item

    def load(self, samples: Sequence[ImageSample]) -> dict[str, Any]:
        """Pixels `[slots, 3, H, W]`, the `valid` mask, and the samples that failed to decode."""
        pixels = torch.zeros(self.slots, 3, self.resolution, self.resolution)
        valid = torch.zeros(self.slots, dtype=torch.bool)
        failed: list[tuple[ImageSample, str]] = []
        for slot, sample in enumerate(samples):
            try:
                pixels[slot] = prepare(sample.image, self.resolution)
            except ImageError as error:
                if self.strict:
                    raise
                failed.append((sample, str(error)))
                continue
            valid[slot] = True
        return {"samples": list(samples), "pixels": pixels, "valid": valid, "failed": failed}


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


class SlotStream(IterableDataset):
    """The "data" of continuous batching: a stream of UNet calls, and the images that feed it.

    Each item is one training batch (one inner iteration over the slots still optimising); the
    run decides itself when it is over (`NullTextInversion` ends the epoch once every image is
    done), so the stream has no end. The images are not items: slots free up at moments only the
    walk knows, and the walk takes the next images from `take` then.

    Args:
        samples (`Sequence[ImageSample]`): this rank's images, in order.
        resolution (`int`): the model's image side in pixels.
        strict (`bool`, defaults to False): raise on an unreadable image instead of reporting it.
    """

    def __init__(self, samples: Sequence[ImageSample], resolution: int, strict: bool = False) -> None:
        self.samples = list(samples)
        self.resolution = resolution
        self.strict = strict
        self.next = 0  # index of the next image to hand out

    @property
    def remaining(self) -> int:
        return len(self.samples) - self.next

    def take(self, count: int) -> tuple[list[ImageSample], Optional[torch.Tensor], list[tuple[ImageSample, str]]]:
        """Up to `count` readable images: their samples, `[n, 3, H, W]` pixels (None when n = 0),
        and the samples that failed to decode on the way, with their reasons."""
        taken: list[ImageSample] = []
        pixels: list[torch.Tensor] = []
        failed: list[tuple[ImageSample, str]] = []
        while len(taken) < count and self.next < len(self.samples):
            sample = self.samples[self.next]
            self.next += 1
            try:
                pixels.append(prepare(sample.image, self.resolution))
            except ImageError as error:
                if self.strict:
                    raise
                failed.append((sample, str(error)))
                continue
            taken.append(sample)
        return taken, (torch.stack(pixels) if pixels else None), failed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        tick = 0
        while True:
            yield {"tick": tick}
            tick += 1
