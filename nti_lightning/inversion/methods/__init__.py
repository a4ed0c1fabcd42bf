"""The inversion methods, by name: the paper's and the ones it is compared with.

Each is one `InversionMethod` (`base.py`) in a file of its own; registering a new one is one line
in `_REGISTERED` below. Everything else (`nti fit`'s `model.method`, `invert(method=...)`,
`nti bench`'s `methods:`, the app's choice, editing an artifact) looks methods up here.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence

from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import ArtifactError, Inversion
from nti_lightning.inversion.methods.base import InversionMethod
from nti_lightning.inversion.methods.ddim import Ddim
from nti_lightning.inversion.methods.ddpm import Ddpm
from nti_lightning.inversion.methods.direct import Direct
from nti_lightning.inversion.methods.edict import Edict
from nti_lightning.inversion.methods.negative_prompt import NegativePrompt
from nti_lightning.inversion.methods.null_text import NullText
from nti_lightning.inversion.methods.pix2pix_zero import Pix2PixZeroInversion
from nti_lightning.inversion.methods.proxnpi import ProxNpi
from nti_lightning.inversion.sampling import StepCallback

_REGISTERED: tuple[InversionMethod, ...] = (
    NullText(), NegativePrompt(), Ddim(), Direct(), Ddpm(), ProxNpi(), Edict(), Pix2PixZeroInversion()
)

#: Every method by name, in the order pages and tables list them.
REGISTRY: dict[str, InversionMethod] = {method.name: method for method in _REGISTERED}
#: The methods' names.
METHODS: tuple[str, ...] = tuple(REGISTRY)
#: The method of a walk that names none: the paper's.
DEFAULT_METHOD: InversionMethod = REGISTRY["null_text"]
#: The type of a method's name, for signatures that LightningCLI reads (`Literal["null_text", ...]`).
MethodName = Literal[METHODS]  # type: ignore[valid-type]


def method_named(
    name: str, options: Optional[Mapping[str, Any]] = None, option: str = "model.method"
) -> InversionMethod:
    """The method called `name` with its settings `options` over the defaults; `OptionError`
    naming `option` (or `<option>_options.<setting>`) and the choices otherwise."""
    try:
        method = REGISTRY[name]
    except (KeyError, TypeError):
        raise OptionError(f"{option} must be one of {METHODS}, got {name!r}") from None
    if options is not None and not isinstance(options, Mapping):
        raise OptionError(f"{option}_options must be a mapping of settings, got {options!r}")
    return method.configured(options, option=f"{option}_options") if options else method


def method_of(inversion: Inversion, name: Optional[str] = None) -> InversionMethod:
    """The method that made `inversion`, from its metadata. An inversion that names none (built by
    hand) is Direct Inversion's when it carries offsets, else Null-text's; one that names a method
    this version does not know is refused (`ArtifactError` naming it and `name`, e.g. its file)."""
    recorded = inversion.metadata.get("method")
    if recorded is None:
        return REGISTRY["direct" if inversion.latent_offsets is not None else "null_text"]
    if recorded not in REGISTRY:
        where = f"{name}: " if name else ""
        raise ArtifactError(
            f"{where}made by inversion method {recorded!r}, which this version of nti-lightning does not know "
            f"(it knows {', '.join(METHODS)}); upgrade nti-lightning to edit it"
        )
    options = inversion.metadata.get("method_options")
    if not options:
        return REGISTRY[recorded]
    try:
        return REGISTRY[recorded].configured(options, option="method_options")
    except (OptionError, TypeError) as error:
        where = f"{name}: " if name else ""
        raise ArtifactError(f"{where}the recorded {error}") from None


def source_branch_hook(
    inversion: Inversion, prompts: Sequence[str], on_step: Optional[StepCallback]
) -> Optional[StepCallback]:
    """The step hook of an edit of `inversion`: the editor's `on_step` with what the inversion's
    method adds to the source row (see `InversionMethod.source_hook`)."""
    return method_of(inversion).source_hook(inversion, prompts, on_step)


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "REGISTRY",
    "InversionMethod",
    "MethodName",
    "method_named",
    "method_of",
    "source_branch_hook",
]
