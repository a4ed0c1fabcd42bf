"""Null-text Inversion for editing real images with Stable Diffusion, on PyTorch Lightning."""

from nti_lightning.api import invert, reconstruct
from nti_lightning.editing import LocalBlend, Refine, Replace, Reweight, edit
from nti_lightning.inversion.artifact import ArtifactError, Inversion
from nti_lightning.models.loading import load_pipeline
from nti_lightning.training.module import NullTextInversion
from nti_lightning.version import __version__

__all__ = [
    "ArtifactError",
    "Inversion",
    "LocalBlend",
    "NullTextInversion",
    "Refine",
    "Replace",
    "Reweight",
    "__version__",
    "edit",
    "invert",
    "load_pipeline",
    "reconstruct",
]
