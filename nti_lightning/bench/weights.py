"""The networks behind PIE-Bench's metrics, loaded from local files only.

Three metrics need pretrained weights: the structure distance (DINO ViT-B/8), LPIPS (SqueezeNet
1.1 through torchvision) and the two CLIP similarities (CLIP ViT-L/14). Each is loaded from a
local folder or the Hugging Face cache, never downloaded; one that cannot be had is recorded
with its reason, and its metrics are reported "n/a" while the others are computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from nti_lightning.errors import OptionError

#: Where the evaluator's networks live on the Hugging Face hub (transformers form).
DINO_DEFAULT = "facebook/dino-vitb8"
CLIP_DEFAULT = "openai/clip-vit-large-patch14"
#: `lpips` option value meaning torchvision's SqueezeNet 1.1 from the torch hub cache.
LPIPS_DEFAULT = "squeeze"
#: The file torchvision stores SqueezeNet 1.1's ImageNet weights as (under `<hub dir>/checkpoints`).
SQUEEZENET_FILE = "squeezenet1_1-b8a52dc0.pth"
#: DINO's own ViT uses LayerNorm eps 1e-6; the hub's transformers port says 1e-12.
DINO_LAYER_NORM_EPS = 1e-6
#: Option values that turn a network off.
OFF = ("", "none", "off", "false")

#: Which metrics each network serves.
NETWORK_METRICS = {
    "dino": ("structure_distance",),
    "lpips": ("lpips_unedited",),
    "clip": ("clip_whole", "clip_edited"),
}


@dataclass
class BenchNetworks:
    """The loaded networks; `None` for one that could not be had, with the reason in `unavailable`.

    Attributes:
        dino (`transformers.ViTModel`, *optional*): DINO ViT-B/8.
        clip (`transformers.CLIPModel`, *optional*): CLIP ViT-L/14.
        clip_image_processor (*optional*): its PIL-based `CLIPImageProcessor`.
        clip_tokenizer (*optional*): its `CLIPTokenizer`.
        lpips (`torch.nn.Module`, *optional*): torchmetrics' LPIPS with SqueezeNet.
        unavailable (`dict[str, str]`): metric name -> why it cannot be computed.
        device (`torch.device`): where the networks run.
    """

    dino: Optional[torch.nn.Module] = None
    clip: Optional[torch.nn.Module] = None
    clip_image_processor: Any = None
    clip_tokenizer: Any = None
    lpips: Optional[torch.nn.Module] = None
    unavailable: dict[str, str] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def mark_unavailable(self, network: str, reason: str) -> None:
        """Records `reason` for every metric of `network`.

        Args:
            network (`str`): "dino", "lpips" or "clip".
            reason (`str`): why, shown beside the metric's "n/a".
        """
        for metric in NETWORK_METRICS[network]:
            self.unavailable[metric] = reason


def _reason(error: BaseException) -> str:
    """The first line of an error, enough to say why (a missing file, no network, ...)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences transformers' notices while loading (the DINO checkpoint's unused pooler, ...)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_dino(source: str = DINO_DEFAULT, device: Union[str, torch.device] = "cpu",
              layer_norm_eps: Optional[float] = DINO_LAYER_NORM_EPS) -> torch.nn.Module:
    """DINO ViT-B/8 as a transformers `ViTModel`, from a local folder or the hub cache.

    Args:
        source (`str`, defaults to "facebook/dino-vitb8"): a folder with `config.json` and the
            weights, or a hub id already in the cache (nothing is downloaded).
        device (`str` or `torch.device`, defaults to "cpu"): where the model goes.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): DINO's LayerNorm epsilon, which
            the hub's config gives as 1e-12; `None` keeps the config's.

    Raises:
        `OSError` or `ValueError`: the weights are not there (transformers' own errors).
    """
    from transformers import ViTModel

    overrides = {} if layer_norm_eps is None else {"layer_norm_eps": layer_norm_eps}
    with _quiet_transformers():
        model = ViTModel.from_pretrained(source, local_files_only=True, add_pooling_layer=False, **overrides)
    return model.to(device).eval()


def _clip_image_processor(source: str) -> Any:
    """CLIP's PIL-based image processor (transformers 5 calls it `CLIPImageProcessorPil`; before,
    `CLIPImageProcessor` was that one). The evaluator's transformers resized with PIL; the
    torchvision backend of newer releases resizes slightly differently. A folder without a
    preprocessor config gets OpenAI CLIP's settings, which are the class defaults."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    try:
        return cls.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return cls()


def _clip_tokenizer(source: str) -> Any:
    """The folder's CLIP tokenizer, or the package's copy of OpenAI CLIP's when it has none.

    transformers 5 builds an empty tokenizer from a folder without vocabulary files instead of
    failing, so a tokenizer that does not know CLIP's start token counts as none.
    """
    from transformers import CLIPTokenizer

    from nti_lightning.models.tokenizer import clip_tokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return clip_tokenizer()
    if tokenizer.convert_tokens_to_ids("<|startoftext|>") in (None, tokenizer.unk_token_id) or len(tokenizer) < 1000:
        return clip_tokenizer()
    return tokenizer


def load_clip(source: str = CLIP_DEFAULT, device: Union[str, torch.device] = "cpu") -> tuple[Any, Any, Any]:
    """CLIP ViT-L/14 with its image processor and tokenizer, from a local folder or the hub cache.

    Args:
        source (`str`, defaults to "openai/clip-vit-large-patch14"): a folder (`config.json` and
            weights; the preprocessor and tokenizer files are optional, OpenAI CLIP's are used
            when absent) or a hub id already in the cache.
        device (`str` or `torch.device`, defaults to "cpu"): where the model goes.

    Returns:
        `tuple`: (`CLIPModel`, image processor, `CLIPTokenizer`).
    """
    from transformers import CLIPModel

    with _quiet_transformers():
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        return model.to(device).eval(), _clip_image_processor(source), _clip_tokenizer(source)


def _squeezenet_file() -> str:
    """torchvision's file name for SqueezeNet 1.1's weights (from torchvision when it is there)."""
    try:
        from torchvision.models import SqueezeNet1_1_Weights

        return SqueezeNet1_1_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    except (ImportError, AttributeError):
        return SQUEEZENET_FILE


@contextlib.contextmanager
def _torch_hub_dir(folder: str) -> Iterator[None]:
    """Points torch.hub (where torchvision looks for weights) at `folder` for the block."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(folder)
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def load_lpips(source: str = LPIPS_DEFAULT, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`, as the evaluator's.

    Its linear heads ship inside torchmetrics; the SqueezeNet 1.1 backbone is torchvision's
    ImageNet checkpoint, which must already be on disk (it is not downloaded here).

    Args:
        source (`str`, defaults to "squeeze"): "squeeze" for the torch hub cache
            (`torch.hub.get_dir()`, `$TORCH_HOME/hub`), or a torch hub folder: the checkpoint is
            read from `<folder>/checkpoints/squeezenet1_1-b8a52dc0.pth`.
        device (`str` or `torch.device`, defaults to "cpu"): where the network goes.

    Raises:
        `ImportError`: torchvision is not installed.
        `FileNotFoundError`: the checkpoint is not on disk.
    """
    try:
        import torchvision  # noqa: F401  (torchmetrics builds the backbone with it)
    except ImportError as error:
        raise ImportError("needs torchvision, which is not installed") from error
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    hub_dir = torch.hub.get_dir() if source == LPIPS_DEFAULT else str(source)
    checkpoint = Path(hub_dir) / "checkpoints" / _squeezenet_file()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"SqueezeNet 1.1 weights not found at {checkpoint} (not downloaded)")
    with _torch_hub_dir(hub_dir):
        metric = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    return metric.to(device).eval()


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`device` as a `torch.device` ("cuda" when there is a GPU and none is named, else "cpu").

    Args:
        device (`str` or `torch.device`, *optional*): a device name such as "cpu" or "cuda:1".

    Raises:
        `OptionError`: an unknown device name, or CUDA asked for where there is none.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise OptionError(f"bench.device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"bench.device {device!r}: CUDA is not available on this machine")
    return resolved


def _names_a_missing_path(source: str) -> bool:
    """Whether `source` is written as a path (not a hub id, which has no leading `/`, `.` or `~`
    and at most one `/`) and names nothing on disk; transformers would report it as a bad hub id."""
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
    return looks_like_path and not Path(source).expanduser().exists()


def load_networks(dino: Optional[str] = DINO_DEFAULT, clip: Optional[str] = CLIP_DEFAULT,
                  lpips: Optional[str] = LPIPS_DEFAULT, device: Union[str, torch.device, None] = None) -> BenchNetworks:
    """Loads every network it can; records each one it cannot, with why.

    Args:
        dino (`str`, *optional*, defaults to "facebook/dino-vitb8"): see `load_dino`; `None` or
            "none" turns the structure distance off.
        clip (`str`, *optional*, defaults to "openai/clip-vit-large-patch14"): see `load_clip`;
            `None` or "none" turns the CLIP similarities off.
        lpips (`str`, *optional*, defaults to "squeeze"): see `load_lpips`; `None` or "none"
            turns LPIPS off.
        device (`str` or `torch.device`, *optional*): "cuda" when there is a GPU, else "cpu".

    Returns:
        `BenchNetworks`: never raises for a missing network; see its `unavailable`.

    Raises:
        `OptionError`: `device` names no usable device.
    """
    device = resolve_device(device)
    networks = BenchNetworks(device=device)
    for name, source, load in (("dino", dino, load_dino), ("clip", clip, load_clip), ("lpips", lpips, load_lpips)):
        if source is None or str(source).strip().lower() in OFF:
            networks.mark_unavailable(name, f"turned off (bench.{name} none)")
            continue
        if _names_a_missing_path(str(source)):
            networks.mark_unavailable(name, f"{name} weights {source!r}: no such folder")
            continue
        if str(source).startswith("~"):
            source = str(Path(source).expanduser())  # transformers takes "~/x" for a hub id
        try:
            loaded = load(str(source), device)
        except (OSError, ValueError, ImportError, RuntimeError) as error:
            networks.mark_unavailable(name, f"{name} weights {source!r} cannot be loaded: {_reason(error)}")
            continue
        if name == "clip":
            networks.clip, networks.clip_image_processor, networks.clip_tokenizer = loaded
        else:
            setattr(networks, name, loaded)
    return networks
