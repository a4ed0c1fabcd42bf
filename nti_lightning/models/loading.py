"""Loading a Stable Diffusion or SDXL pipeline from a name, a hub id, a folder or a checkpoint file."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Union

import torch
import transformers
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open

from nti_lightning.diffusion.ddim import ddim_scheduler
from nti_lightning.errors import ModelError, ModelNotFoundError
from nti_lightning.models.pipelines import Pipeline, cast_pipeline, is_sdxl
from nti_lightning.models.sd15 import sd15_random_pipeline
from nti_lightning.models.sdxl import (
    clip_tokenizer_2,
    sdxl_random_pipeline,
    tiny_xl_pipeline,
)
from nti_lightning.models.tiny import tiny_pipeline
from nti_lightning.models.tokenizer import clip_tokenizer

#: diffusers' single-file model types (`infer_diffusers_model_type`) whose UNet is SDXL's: SDXL
#: base and its fine-tunes, the SDXL inpainting and refiner UNets, Playground v2.5.
SDXL_CHECKPOINT_TYPES = frozenset({"xl_base", "xl_inpaint", "xl_refiner", "playground-v2-5"})


def shapes_pipeline(torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The trained `shapes` model shipped in the package (32 px coloured shapes; see docs/SHAPES_MODEL.md).

    Its weights are stored in fp16 and upcast to `torch_dtype`. The folder holds no tokenizer
    files: like any such folder, it gets CLIP's tokenizer, rebuilt offline by `clip_tokenizer()`.

    Args:
        torch_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the loaded weights.
    """
    with resources.as_file(resources.files("nti_lightning.assets") / "shapes") as folder:
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(f"{folder}: the shipped 'shapes' model is missing (no model_index.json)")
        return _load_external(str(folder), torch_dtype)


def _build_device() -> str | None:
    """Where the large random built-ins are created: on the GPU when there is one, as the
    weights are bound for it anyway (SDXL's 3.5B fp32 parameters are 14 GB to build on the host
    and copy). CPU and CUDA random streams differ, so their weights differ between the two."""
    return "cuda" if torch.cuda.is_available() else None


#: Names resolved without any download.
BUILTIN_MODELS = {
    "tiny": lambda: tiny_pipeline(seed=0),
    "tiny-v": lambda: tiny_pipeline(seed=0, prediction_type="v_prediction"),
    "tiny-xl": lambda: tiny_xl_pipeline(seed=0),
    "shapes": shapes_pipeline,
    "sd15-random": lambda: sd15_random_pipeline(seed=0),
    "sdxl-random": lambda: sdxl_random_pipeline(seed=0, device=_build_device()),
}


def load_pipeline(pretrained: str, torch_dtype: torch.dtype | None = None) -> Pipeline:
    """Loads a Stable Diffusion or SDXL pipeline with the DDIM scheduler the algorithm uses.

    SDXL models come back as a `StableDiffusionXLPipeline` (see `is_sdxl`), everything else as a
    `StableDiffusionPipeline`. The DDIM scheduler is built from the model's own scheduler config
    (its noise schedule, `steps_offset` and `timestep_spacing`), whatever scheduler class the
    model names (SDXL's is `EulerDiscreteScheduler`).

    Args:
        pretrained (`str`): one of
            - a built-in name: "tiny" (seeded random SD-shaped model) or "tiny-v" (its
              v-prediction twin); "tiny-xl" (seeded random SDXL-shaped model); "sd15-random"
              and "sdxl-random" (Stable Diffusion 1.5's and SDXL base's architectures with
              seeded random weights, for benchmarks; "sdxl-random" is built on the GPU when
              there is one); "shapes" (a small model trained on coloured shapes, shipped in the
              package, see docs/SHAPES_MODEL.md);
            - a local diffusers folder (`model_index.json` inside), SDXL when its pipeline class
              is an SDXL one or its UNet takes SDXL's "text_time" conditioning; one without a
              `tokenizer` (`tokenizer_2`) folder, as `nti train-demo` writes, gets CLIP's
              tokenizer (padding with "!", as SDXL's second tokenizer does);
            - a single-file `.safetensors` checkpoint in the original SD or SDXL layout (told
              apart by the tensor names in the file's header);
            - a hub id such as "CompVis/stable-diffusion-v1-4" or
              "stabilityai/stable-diffusion-xl-base-1.0" (needs network or a warm cache; the
              pipeline class is read from the hub's `model_index.json`).
        torch_dtype (`torch.dtype`, *optional*): dtype for the weights; defaults to fp32. In fp16
            an SDXL model's VAE stays fp32 when its config sets `force_upcast` (SDXL's own VAE
            overflows in fp16); an fp16-safe VAE (`force_upcast: false`, such as
            madebyollin's `sdxl-vae-fp16-fix`) is loaded in fp16 like the rest.
    """
    if pretrained in BUILTIN_MODELS:
        pipeline = BUILTIN_MODELS[pretrained]()
        if torch_dtype is not None:
            pipeline = cast_pipeline(pipeline, torch_dtype)
        # Artifacts record a built-in model by its name rather than "in-memory" or an install path.
        pipeline.register_to_config(_name_or_path=pretrained)
    else:
        pipeline = _load_external(pretrained, torch_dtype)
    pipeline.scheduler = ddim_scheduler(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """Hides diffusers' and transformers' per-component loading bars (a run has its own progress)."""
    libraries = (diffusers_logging, transformers.utils.logging)
    were_enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, enabled in zip(libraries, were_enabled):
            if enabled:
                library.enable_progress_bar()


def _load_external(pretrained: str, torch_dtype: torch.dtype | None) -> Pipeline:
    """`load_pipeline` for anything but a built-in name."""
    with _no_loading_bars():
        try:
            pipeline = _load_from(pretrained, torch_dtype)
        except ModelError:
            raise
        except (OSError, ValueError) as error:  # no such hub id, no network, a broken folder or file
            raise ModelError(
                f"{pretrained}: cannot load the model "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            ) from error
    if torch_dtype is not None and is_sdxl(pipeline):
        # An SDXL pipeline comes in fp16 with its VAE read in fp32 (`_pipeline_kwargs`), or from a
        # single file entirely in fp16: give the VAE the dtype its `force_upcast` asks for (the
        # other networks already have theirs, so only the VAE moves).
        cast_pipeline(pipeline, torch_dtype)
    return pipeline


def _load_from(pretrained: str, torch_dtype: torch.dtype | None) -> Pipeline:
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        index = _read_json(path / "model_index.json")
        unet_config = _read_json(path / "unet" / "config.json")
        xl = _index_is_sdxl(index) or unet_config.get("addition_embed_type") == "text_time"
        kwargs = _pipeline_kwargs(xl, torch_dtype, from_pretrained=True)
        # Folders written by `nti train-demo` leave CLIP's tokenizer out (it is rebuilt offline);
        # without this, transformers builds one with no length limit.
        if not (path / "tokenizer").is_dir() and (not xl or _lists(index, "tokenizer")):
            kwargs["tokenizer"] = clip_tokenizer()
        if xl and not (path / "tokenizer_2").is_dir() and _lists(index, "tokenizer_2"):
            kwargs["tokenizer_2"] = clip_tokenizer_2()
        return _pipeline_class(xl).from_pretrained(path, **kwargs)
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        # These are pickles: loading one runs arbitrary code from whoever made it.
        raise ModelError(
            f"{path}: pickled checkpoints are not loaded; convert it to .safetensors "
            "(or a diffusers folder) and pass that instead"
        )
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: checkpoint file not found")
        xl = is_sdxl_checkpoint(path)
        # from_single_file takes one dtype for all networks; `_load_external` then fixes the VAE's.
        kwargs = _pipeline_kwargs(xl, torch_dtype, from_pretrained=False)
        return _pipeline_class(xl).from_single_file(str(path), **kwargs)
    if path.exists() or pretrained.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{pretrained}: neither a diffusers folder nor a .safetensors checkpoint")
    xl = _index_is_sdxl(_hub_model_index(pretrained))
    kwargs = _pipeline_kwargs(xl, torch_dtype, from_pretrained=True)
    return _pipeline_class(xl).from_pretrained(pretrained, **kwargs)


def _hub_model_index(repo_id: str) -> dict[str, Any]:
    """A hub repository's `model_index.json` (one small download, then cached), which names its
    pipeline class."""
    try:
        with warnings.catch_warnings():
            # diffusers' `load_config` passes huggingface_hub a deprecated keyword, which warns.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return dict(DiffusionPipeline.load_config(repo_id))
    except OSError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, LocalEntryNotFoundError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        # diffusers words this "does not appear to have a file named model_index.json".
        raise ModelError(
            f"{repo_id}: cannot load the model (not in the local cache, and the Hugging Face Hub cannot be reached)"
        ) from error


def single_file_model_type(path: Union[str, os.PathLike]) -> str | None:
    """diffusers' name for the model in a single-file `.safetensors` checkpoint ("v1", "v2",
    "xl_base", "xl_refiner", ...), or `None` when it is none diffusers knows. Only the file's
    header (tensor names and shapes) is read, not its weights.

    Args:
        path (`str` or `os.PathLike`): the checkpoint file.
    """
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            # `infer_diffusers_model_type` looks at which names exist and at a few shapes only.
            header = {
                name: SimpleNamespace(shape=torch.Size(checkpoint.get_slice(name).get_shape()))
                for name in checkpoint.keys()
            }
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{path}: not a readable .safetensors checkpoint ({reason})") from error
    try:
        return infer_diffusers_model_type(header)
    except (KeyError, IndexError, AttributeError):  # a model type it recognises by a tensor this file lacks
        return None


def is_sdxl_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """Whether a single-file `.safetensors` checkpoint holds an SDXL-architecture model (its
    `conditioner.embedders.*` OpenCLIP bigG keys, as diffusers recognises them). Only the header
    is read.

    Args:
        path (`str` or `os.PathLike`): the checkpoint file.
    """
    return single_file_model_type(path) in SDXL_CHECKPOINT_TYPES


def _pipeline_class(xl: bool) -> type[DiffusionPipeline]:
    """The pipeline class for an SDXL (`xl`) or an SD model."""
    return StableDiffusionXLPipeline if xl else StableDiffusionPipeline


def _pipeline_kwargs(xl: bool, torch_dtype: torch.dtype | None, from_pretrained: bool) -> dict[str, Any]:
    """The keywords of `from_pretrained` / `from_single_file` for an SD or an SDXL pipeline."""
    if xl:
        # No invisible watermark on anything decoded (and no need for its package).
        kwargs: dict[str, Any] = {"add_watermarker": False}
    else:
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
    if torch_dtype is not None:
        # diffusers' current name; `torch_dtype` is deprecated. `from_pretrained` takes one dtype
        # per component: an fp16 SDXL VAE is read in fp32 directly rather than rounded through fp16
        # (`_load_external` casts it to fp16 afterwards when its config allows).
        xl_fp16 = xl and from_pretrained and torch_dtype == torch.float16
        kwargs["dtype"] = {"default": torch_dtype, "vae": torch.float32} if xl_fp16 else torch_dtype
    return kwargs


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON config file's content; `{}` when there is no such file (or it holds no object)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: not a valid JSON config ({error})") from error
    return content if isinstance(content, dict) else {}


def _index_is_sdxl(index: dict[str, Any]) -> bool:
    """Whether a `model_index.json` names an SDXL pipeline class (StableDiffusionXLPipeline,
    its img2img/inpainting variants, ...)."""
    return "XL" in str(index.get("_class_name", ""))


def _lists(index: dict[str, Any], component: str) -> bool:
    """Whether a `model_index.json` expects `component` (not absent, not `[null, null]`)."""
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and any(part is not None for part in entry)

