"""`InversionDataModule`: which images to invert with which prompts, in batches of B, on which rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from nti_lightning.data.dataset import DatasetError, Failure, read_folder, read_manifest
from nti_lightning.data.images import ImageError
from nti_lightning.data.plan import InversionPlan, make_plan
from nti_lightning.data.walk import ImageSample, PivotWalk, SlotStream, WalkSampler
from nti_lightning.errors import OptionError, check_id
from nti_lightning.storage.lock import OutputLock


class InversionDataModule(pl.LightningDataModule):
    """Images and their source prompts, served as walks over their pivot trajectories.

    Give one of: an `image` with its `prompt`; lists `images` and `prompts` (or one `prompt` for
    all); a `manifest` (JSONL or CSV, see `nti_lightning.data.dataset`); or a `folder` of images
    with `.txt` prompt sidecars. From Python, `images` may also be PIL images.

    Images are inverted in batches of B, each rank taking its own share (see
    `nti_lightning.data.plan`). Images whose artifact already exists in the module's
    `output_dir` are skipped, so rerunning a killed run finishes it; entries that cannot be
    read are recorded in `failures.jsonl` next to the artifacts and the rest go on.

    Args:
        image (`str`, *optional*): path of a single image.
        prompt (`str`, *optional*): its source prompt (also the prompt of every image in `images`
            when `prompts` is not given).
        images (`list[str]`, *optional*): paths of several images.
        prompts (`list[str]`, *optional*): one source prompt per image of `images`.
        ids (`list[str]`, *optional*): artifact names for `images`; default: the file stems (made unique).
        manifest (`str`, *optional*): a `.jsonl` or `.csv` manifest of the dataset.
        folder (`str`, *optional*): a folder of images with `<stem>.txt` prompts.
        batch_size (`int`, defaults to 1): B, images optimised together in one batch; results do
            not depend on it beyond float rounding.
        overwrite (`bool`, defaults to False): invert every image again even when its artifact
            exists and is valid.
        strict (`bool`, defaults to False): raise on the first unreadable image instead of
            recording it and going on (the Python API's behaviour).
    """

    def __init__(
        self,
        image: Optional[str] = None,
        prompt: Optional[str] = None,
        images: Optional[list[str]] = None,
        prompts: Optional[list[str]] = None,
        ids: Optional[list[str]] = None,
        manifest: Optional[str] = None,
        folder: Optional[str] = None,
        batch_size: int = 1,
        overwrite: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise OptionError(f"data.batch_size must be at least 1, got {batch_size}")
        sources = [
            name
            for name, value in (("image/images", image or images), ("manifest", manifest), ("folder", folder))
            if value
        ]
        if len(sources) > 1:
            raise OptionError(f"give one source of images, not {' and '.join(sources)}")
        self.failures: list[Failure] = []
        if manifest:
            self.samples, self.failures = read_manifest(manifest)
        elif folder:
            self.samples, self.failures = read_folder(folder)
        else:
            self.samples = _samples(image, prompt, images, prompts, ids)
        repeated = _repeated([sample.id for sample in self.samples])
        if repeated:
            raise DatasetError(f"{manifest or folder}: ids must be unique (artifact names), repeated: {repeated[:5]}")
        self.batch_size = batch_size
        self.overwrite = overwrite
        self.strict = strict
        self.plan: Optional[InversionPlan] = None
        self.lock: Optional[OutputLock] = None  # rank 0's lock on the output folder, during fit

    def setup(self, stage: str) -> None:
        # Rank 0 decides and broadcasts: every rank must agree on the batches even while another
        # rank is already writing artifacts. An error is broadcast too, or the other ranks would
        # wait for the plan forever.
        trainer, module = self.trainer, self.trainer.lightning_module
        outcome: Any = None
        if trainer.is_global_zero:
            try:
                if module.hparams.output_dir is not None and self.lock is None:
                    self.lock = OutputLock(module.hparams.output_dir).acquire()
                outcome = make_plan(
                    self.samples,
                    self.failures,
                    self.batch_size,
                    world_size=trainer.world_size,
                    output_dir=module.hparams.output_dir,
                    settings=module.run_settings(),
                    overwrite=self.overwrite,
                )
            except Exception as error:  # noqa: BLE001 - re-raised on every rank below
                outcome = error
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if isinstance(outcome, Exception):
            raise outcome
        if self.strict and outcome.failures:
            raise ImageError(outcome.failures[0].reason)
        self.plan = outcome
        module.batch_slots = outcome.slots  # the embedding's shape, fixed before DDP wraps it

    def teardown(self, stage: str) -> None:
        self._release_lock()

    def on_exception(self, exception: BaseException) -> None:
        # A failed or interrupted run gets no teardown call: the lock must go here too.
        self._release_lock()

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def train_dataloader(self) -> DataLoader:
        # The walk's length (T, N) and the image size are the model's.
        module: Any = self.trainer.lightning_module
        if module.hparams.scheduling == "continuous":
            # Slots take this rank's images one by one as they free up, in plan order.
            samples = [sample for batch in self.plan.rank_batches(self.trainer.global_rank) for sample in batch]
            return DataLoader(SlotStream(samples, module.resolution, strict=self.strict), batch_size=None)
        walk = PivotWalk(
            self.plan.rank_batches(self.trainer.global_rank),
            num_inference_steps=module.hparams.num_inference_steps,
            num_inner_steps=module.inner_iterations,
            resolution=module.resolution,
            slots=self.plan.slots,
            strict=self.strict,
        )
        # batch_size=None: items are already whole batches; no collation.
        return DataLoader(walk, batch_size=None, sampler=WalkSampler(walk))


def _samples(
    image: Any,
    prompt: Optional[str],
    images: Optional[list[Any]],
    prompts: Optional[list[str]],
    ids: Optional[list[str]],
) -> list[ImageSample]:
    if image is not None:
        if images:
            raise OptionError("give either `image` or `images`, not both")
        images = [image]
    if not images:
        raise OptionError("no input image: set `image` (and `prompt`) or `images` (and `prompts`)")
    if prompts is None:
        if prompt is None:
            raise OptionError("no source prompt: set `prompt` or `prompts`")
        prompts = [prompt] * len(images)
    if len(prompts) != len(images):
        raise OptionError(f"{len(images)} images but {len(prompts)} prompts")
    for item in images:
        if isinstance(item, (str, Path)) and not Path(item).is_file():
            raise ImageError(f"{item}: image file not found")
    if ids is None:
        ids = [Path(item).stem if isinstance(item, (str, Path)) else f"image_{i}" for i, item in enumerate(images)]
    elif len(ids) != len(images):
        raise OptionError(f"{len(images)} images but {len(ids)} ids")
    else:
        ids = [check_id(str(name), "ids") for name in ids]
    return [ImageSample(id=name, prompt=text, image=item) for name, text, item in zip(_unique(ids), prompts, images)]


def _unique(ids: list[str]) -> list[str]:
    """Appends `-2`, `-3`, ... to repeated ids so that no artifact overwrites another."""
    seen: dict[str, int] = {}
    unique = []
    for name in ids:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _repeated(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return [name for name in ids if name in seen or seen.add(name)]
