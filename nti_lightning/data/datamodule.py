"""`InversionDataModule`: which images to invert with which prompts, in batches of B."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from nti_lightning.data.images import ImageError
from nti_lightning.data.walk import ImageSample, PivotWalk, WalkSampler


class InversionDataModule(pl.LightningDataModule):
    """Images and their source prompts, served as walks over their pivot trajectories.

    Give either one `image` with its `prompt`, or lists `images` and `prompts` of equal length
    (one prompt is used for every image). From Python, images may also be PIL images.

    Args:
        image (`str`, *optional*): path of a single image.
        prompt (`str`, *optional*): its source prompt (also the prompt of every image in `images`
            when `prompts` is not given).
        images (`list[str]`, *optional*): paths of several images.
        prompts (`list[str]`, *optional*): one source prompt per image of `images`.
        ids (`list[str]`, *optional*): artifact names; default: the file stems (made unique).
        batch_size (`int`, defaults to 1): B, images optimised together in one batch; results do
            not depend on it.
    """

    def __init__(
        self,
        image: Optional[str] = None,
        prompt: Optional[str] = None,
        images: Optional[list[str]] = None,
        prompts: Optional[list[str]] = None,
        ids: Optional[list[str]] = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.samples = _samples(image, prompt, images, prompts, ids)
        self.batch_size = batch_size

    @property
    def batches(self) -> list[list[ImageSample]]:
        return [self.samples[i : i + self.batch_size] for i in range(0, len(self.samples), self.batch_size)]

    def train_dataloader(self) -> DataLoader:
        # The walk's length (T, N) and the image size are the model's.
        module: Any = self.trainer.lightning_module
        walk = PivotWalk(
            self.batches,
            num_inference_steps=module.hparams.num_inference_steps,
            num_inner_steps=module.hparams.num_inner_steps,
            resolution=module.resolution,
        )
        # batch_size=None: items are already whole batches; no collation.
        return DataLoader(walk, batch_size=None, sampler=WalkSampler(walk))


def _samples(
    image: Any, prompt: Optional[str], images: Optional[list[Any]], prompts: Optional[list[str]], ids: Optional[list[str]]
) -> list[ImageSample]:
    if image is not None:
        if images:
            raise ValueError("give either `image` or `images`, not both")
        images = [image]
    if not images:
        raise ValueError("no input image: set `image` (and `prompt`) or `images` (and `prompts`)")
    if prompts is None:
        if prompt is None:
            raise ValueError("no source prompt: set `prompt` or `prompts`")
        prompts = [prompt] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    for item in images:
        if isinstance(item, (str, Path)) and not Path(item).is_file():
            raise ImageError(f"{item}: image file not found")
    if ids is None:
        ids = [Path(item).stem if isinstance(item, (str, Path)) else f"image_{i}" for i, item in enumerate(images)]
    elif len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    return [ImageSample(id=name, prompt=text, image=item) for name, text, item in zip(_unique(ids), prompts, images)]


def _unique(ids: list[str]) -> list[str]:
    """Appends `-2`, `-3`, ... to repeated ids so that no artifact overwrites another."""
    seen: dict[str, int] = {}
    unique = []
    for name in ids:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique
