"""`InversionPlan`: which images a run inverts, in which batches, on which rank.

Made once on rank 0 and broadcast, so every rank agrees on it even when another rank starts
writing artifacts while the others are still starting up:

* images whose artifact already exists and validates are skipped (a resumed run); a corrupt
  artifact is redone; one made with other settings stops the run with a clear error, unless
  `overwrite` is set, so no finished work is replaced by accident;
* images that cannot be read are failures, recorded with their reason;
* the rest are cut into global batches of B, in dataset order, dealt to the ranks round-robin.
  A batch's contents do not depend on the number of ranks, so 1 and 8 GPUs compute the same
  batches and give the same artifacts. Every rank walks the same number of batches (the short
  ones get empty batches at the end): Lightning's per-epoch collectives then never wait on a
  rank that has already finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nti_lightning.data.dataset import DatasetError, Failure, check_image
from nti_lightning.data.walk import ImageSample
from nti_lightning.inversion.artifact import ArtifactError, Inversion
from nti_lightning.storage.atomic import ensure_folder

#: Settings an existing artifact must share with the run to count as this run's result.
MATCHED_SETTINGS = (
    "model",
    "model_fingerprint",
    "method",
    "num_inference_steps",
    "guidance_scale",
    "num_inner_steps",
    "early_stop_epsilon",
    "learning_rate",
)


@dataclass
class InversionPlan:
    """The work of one run.

    Args:
        batches (`list[list[ImageSample]]`): global batches to invert, in dataset order.
        slots (`int`): images per trajectory, the null embedding's batch dimension on every rank.
        world_size (`int`): number of ranks.
        skipped (`list[tuple[ImageSample, str]]`): images already inverted, with their artifact path.
        failures (`list[Failure]`): entries that are not inverted, with their reasons.
        redone (`list[str]`): ids whose corrupt artifact is inverted again.
    """

    batches: list[list[ImageSample]]
    slots: int
    world_size: int = 1
    skipped: list[tuple[ImageSample, str]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def batches_per_rank(self) -> int:
        return -(-len(self.batches) // self.world_size)

    def rank_batches(self, rank: int) -> list[list[ImageSample]]:
        """Rank `rank`'s batches: every `world_size`-th global batch, padded with empty ones."""
        mine = self.batches[rank :: self.world_size]
        return mine + [[] for _ in range(self.batches_per_rank - len(mine))]

    def images_done(self, batches_finished: int) -> int:
        """Images of all ranks once each rank has finished `batches_finished` of its batches."""
        return sum(len(batch) for batch in self.batches[: batches_finished * self.world_size])


def make_plan(
    samples: list[ImageSample],
    failures: list[Failure],
    batch_size: int,
    world_size: int = 1,
    output_dir: Optional[str | Path] = None,
    settings: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
    check_images: bool = True,
) -> InversionPlan:
    """Decides the work of a run.

    Args:
        samples (`list[ImageSample]`): the dataset's usable entries, in order.
        failures (`list[Failure]`): entries already known to be unusable.
        batch_size (`int`): B, the most images per trajectory.
        world_size (`int`, defaults to 1): number of ranks.
        output_dir (`str` or `Path`, *optional*): where artifacts go; `None` skips nothing.
        settings (`dict`, *optional*): the run's values of `MATCHED_SETTINGS`.
        overwrite (`bool`, defaults to False): invert again even where a valid artifact exists.
        check_images (`bool`, defaults to True): read each image file's header now and record
            unreadable ones as failures (PIL images given from Python are not checked).
    """
    failures = list(failures)
    if output_dir is not None:
        ensure_folder(output_dir)  # before any work: a folder that cannot be made stops the run now
    pending, skipped, redone, conflicts = [], [], [], []
    for sample in samples:
        if check_images and isinstance(sample.image, (str, Path)):
            reason = check_image(sample.image)
            if reason is not None:
                failures.append(Failure(id=sample.id, image=str(sample.image), reason=reason))
                continue
        artifact = Path(output_dir) / f"{sample.id}.safetensors" if output_dir is not None else None
        if artifact is not None:
            # A run killed while writing leaves its temporary file behind; the image is redone.
            for orphan in artifact.parent.glob(f".{artifact.name}.*.tmp"):
                orphan.unlink(missing_ok=True)
        if artifact is None or overwrite or not artifact.exists():
            pending.append(sample)
            continue
        try:
            metadata = Inversion.read_metadata(artifact)
        except ArtifactError:
            redone.append(sample.id)  # a corrupt file holds nothing to keep
            pending.append(sample)
            continue
        differences = _differences(metadata, {**(settings or {}), "prompt": sample.prompt})
        if differences:
            conflicts.append(f"{artifact} ({differences})")
        else:
            skipped.append((sample, str(artifact)))
    if conflicts:
        listed = "; ".join(conflicts[:3]) + (f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
        raise DatasetError(
            f"{len(conflicts)} existing artifact(s) were made with other settings: {listed}. "
            "Use another output_dir, or set overwrite to replace them."
        )
    slots = max(1, min(batch_size, len(pending)))
    batches = [pending[i : i + slots] for i in range(0, len(pending), slots)]
    return InversionPlan(batches, slots, world_size, skipped, failures, redone)


def _differences(metadata: dict[str, Any], settings: dict[str, Any]) -> str:
    found = []
    for key, wanted in settings.items():
        if key == "model_fingerprint" and key not in metadata:
            continue  # written before fingerprints were recorded: the model name must do
        have = metadata.get(key, "null_text" if key == "method" else None)  # older files are null-text
        if have != wanted:
            found.append(f"{key}: {have!r} there, {wanted!r} now")
    return ", ".join(found)
