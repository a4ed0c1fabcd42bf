"""Null-text Inversion for editing real images with Stable Diffusion, on PyTorch Lightning."""

from nti_lightning.console import silence_notices

silence_notices()

# Imported after the filters are in place: these imports are what emit some of the notices.
from nti_lightning.api import invert, reconstruct  # noqa: E402
from nti_lightning.editing import (  # noqa: E402
    LocalBlend,
    MasaCtrl,
    Pix2PixZero,
    PlugAndPlay,
    Refine,
    Replace,
    Reweight,
    edit,
)
from nti_lightning.errors import NtiError, OptionError  # noqa: E402
from nti_lightning.host_memory import keep_freed_memory  # noqa: E402
from nti_lightning.inversion.artifact import ArtifactError, Inversion  # noqa: E402
from nti_lightning.inversion.pipeline_kwargs import pipeline_kwargs  # noqa: E402
from nti_lightning.models.loading import load_pipeline  # noqa: E402
from nti_lightning.training.module import NullTextInversion  # noqa: E402
from nti_lightning.version import __version__  # noqa: E402

__all__ = [
    "ArtifactError",
    "Inversion",
    "LocalBlend",
    "MasaCtrl",
    "NtiError",
    "NullTextInversion",
    "OptionError",
    "Pix2PixZero",
    "PlugAndPlay",
    "Refine",
    "Replace",
    "Reweight",
    "__version__",
    "edit",
    "invert",
    "keep_freed_memory",
    "load_pipeline",
    "pipeline_kwargs",
    "reconstruct",
]
