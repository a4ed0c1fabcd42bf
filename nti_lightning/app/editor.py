"""`Editor`: the app's model, cache and one lock; what the page's buttons do, as plain Python.

One `Editor` serves every user: it holds the one pipeline, and its lock lets one inversion or
edit use the model at a time (the page's queue already orders them; the lock keeps that true
for any other caller). Inversions are looked up in the `InversionCache` first, so the same image
with the same prompt, model and settings is inverted once. All the maths is the package's:
`invert`, `reconstruct`, `edit_latents` with the `nti predict` spec's controller or editor
settings (MasaCtrl, Plug-and-Play, Pix2Pix-Zero), the pictures.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from nti_lightning.api import invert, reconstruct
from nti_lightning.app.cache import (
    CachedInversion,
    InversionCache,
    artifact_key,
    inversion_key,
)
from nti_lightning.app.requests import (
    EDITOR_LABELS,
    AppInputError,
    EditRequest,
    InversionSettings,
    source_prompt,
)
from nti_lightning.data.images import ImageError, center_square, open_image, to_pil
from nti_lightning.editing.attention import AttentionStore
from nti_lightning.editing.edit import edit_latents
from nti_lightning.editing.pictures import cross_attention_picture, labelled_grid
from nti_lightning.editing.specs import EditSpec
from nti_lightning.errors import NtiError
from nti_lightning.inversion.artifact import Inversion
from nti_lightning.inversion.compatible import check_compatible
from nti_lightning.inversion.methods import METHODS, method_of
from nti_lightning.models import vae as vae_codec
from nti_lightning.models.fingerprint import model_reference, pipeline_fingerprint
from nti_lightning.models.pipelines import Pipeline
from nti_lightning.training.progress import WalkProgress

#: Tokens per row of the cross-attention picture (a squarer picture than one long row).
ATTENTION_COLUMNS = 4
#: Largest image accepted, in pixels (its size is read before it is decoded).
MAX_PIXELS = 100_000_000
#: Largest inversion file accepted, in bytes (an SDXL file at T = 50 is about 16 MB).
MAX_ARTIFACT_BYTES = 256 * 2**20


class Cancelled(NtiError):
    """The user cancelled the inversion; nothing of it was kept."""


@dataclass(frozen=True)
class InversionResult:
    """What an inversion gives the page: the entry, whether the cache had it, how long it took, and
    the settings it was asked with (None for an uploaded file)."""

    entry: CachedInversion
    cached: bool
    seconds: float
    settings: Optional[InversionSettings] = None


@dataclass(frozen=True)
class EditResult:
    """An edit's pictures.

    Args:
        kind (`str`): "replace" or "refine" (with "+ reweight" when words were reweighted), or the
            editor's label ("MasaCtrl", "Plug-and-Play", "Pix2Pix-Zero").
        prompts (`list[str]`): the source prompt, then the targets.
        edits (`list[PIL.Image]`): one image per target, at the model's resolution.
        grid (`PIL.Image`): input | reconstruction | edits, labelled.
        attention (`PIL.Image`, *optional*): the source prompt's cross-attention map per token; None
            when the editor records none (Plug-and-Play).
        seconds (`float`): time the edit took.
        attention_prompt (`str`, defaults to ""): the prompt whose tokens `attention` shows: the
            source prompt, or Pix2Pix-Zero's caption.
    """

    kind: str
    prompts: list[str]
    edits: list[Image.Image]
    grid: Image.Image
    attention: Optional[Image.Image]
    seconds: float
    attention_prompt: str = ""


class Editor:
    """Inverts and edits images with one pipeline for every user of the app.

    Args:
        pipeline (`Pipeline`): an SD or SDXL pipeline (`load_pipeline`), on its device.
        cache (`InversionCache`): where inversions are kept.
        precision (`str`, defaults to "32-true"): the inversion's Lightning precision.
        accelerator (`str`, defaults to "auto"): the inversion's Lightning accelerator.
        defaults (`InversionSettings`, *optional*): the settings the page starts with.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        cache: InversionCache,
        precision: str = "32-true",
        accelerator: str = "auto",
        defaults: Optional[InversionSettings] = None,
    ) -> None:
        self.pipeline = pipeline
        self.cache = cache
        self.precision = precision
        self.accelerator = accelerator
        self.defaults = (defaults or InversionSettings()).checked()
        self.fingerprint = pipeline_fingerprint(pipeline)
        self.model = model_reference(pipeline)
        self.resolution = vae_codec.resolution(pipeline.vae, pipeline.unet.config.sample_size)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------ inputs
    def prepare_image(self, path: str | Path, name: Optional[str] = None) -> Image.Image:
        """The image at `path` as the model sees it (RGB, centre square, model resolution).

        Args:
            path (`str` or `Path`): the image file.
            name (`str`, *optional*): what messages call it (an upload's name on the user's computer, not the
                server's temporary copy); the file's own name by default.

        Raises:
            `ImageError` naming `name`: no image, not a readable one, a degenerate or too large one.
        """
        if not path:
            raise ImageError("no image: upload, drop or paste one (or pick the example)")
        name = name or Path(path).name
        too_large = f"{name}: {{}} is too large (at most {MAX_PIXELS // 1_000_000} megapixels)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # answered below
                with Image.open(path) as probe:  # reads the header only
                    width, height = probe.size
        except Image.DecompressionBombError:
            raise ImageError(too_large.format("the image")) from None
        except (OSError, ValueError, SyntaxError):
            width = height = 0  # open_image names the problem
        if width * height > MAX_PIXELS:
            raise ImageError(too_large.format(f"{width}x{height} px"))
        try:
            image = open_image(path)
        except ImageError as error:  # its message names the server's copy (PIL's may too): name the user's file
            raise ImageError(_renamed(str(error), path, name)) from None
        return center_square(image, self.resolution)

    def key(self, image: Image.Image, prompt: str, settings: InversionSettings) -> str:
        """The cache key of inverting the prepared `image` with `prompt` and `settings` on this model."""
        return inversion_key(image, prompt, self.fingerprint, {**settings.invert_kwargs(), "precision": self.precision})

    # ---------------------------------------------------------------------------- invert
    def invert(
        self,
        path: str | Path,
        prompt: Optional[str],
        settings: Optional[InversionSettings] = None,
        on_progress: Optional[Callable[[WalkProgress], None]] = None,
        cancel: Optional[threading.Event] = None,
        name: Optional[str] = None,
    ) -> InversionResult:
        """Inverts the image at `path`, or finds it in the cache.

        `on_progress` gets the walk's `WalkProgress`; setting `cancel` stops the inversion at
        its next inner iteration with `Cancelled`, and nothing of it is cached. `name` is what
        messages call the image (`prepare_image`).
        """
        started = time.perf_counter()
        prompt = source_prompt(prompt)
        settings = (settings or self.defaults).checked()
        image = self.prepare_image(path, name)
        key = self.key(image, prompt, settings)
        entry = self.cache.get(key)
        if entry is not None:
            return InversionResult(entry, True, time.perf_counter() - started, settings)

        def report(progress: WalkProgress) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the inversion was cancelled")
            if on_progress is not None:
                on_progress(progress)

        with self.lock:
            entry = self.cache.get(key)  # made by another user while this one waited
            if entry is not None:
                return InversionResult(entry, True, time.perf_counter() - started, settings)
            if cancel is not None and cancel.is_set():
                raise Cancelled("the inversion was cancelled")
            [inversion] = invert(
                self.pipeline, image, prompt, **settings.invert_kwargs(), batch_size=1, precision=self.precision,
                accelerator=self.accelerator, progress_bar=False, on_progress=report,
            )
            reconstruction = reconstruct(self.pipeline, inversion, guidance_scale=inversion.guidance_scale)
            entry = self.cache.put(key, inversion, image, reconstruction)
        return InversionResult(entry, False, time.perf_counter() - started, settings)

    def compare(self, result: InversionResult) -> list[CachedInversion]:
        """The cached inversions of `result`'s image and prompt by every method, in `METHODS` order
        (the other settings as `result`'s): the methods side by side, without inverting anything."""
        if result.settings is None:
            return [result.entry]
        image, prompt = result.entry.input_image, result.entry.inversion.prompt
        entries = []
        for method in METHODS:
            key = self.key(image, prompt, replace(result.settings, method=method))
            entry = result.entry if key == result.entry.key else self.cache.get(key)
            if entry is not None:
                entries.append(entry)
        return entries

    def load_artifact(self, path: str | Path, name: Optional[str] = None) -> InversionResult:
        """Takes an uploaded `.safetensors` inversion instead of an image (checked against this model)."""
        started = time.perf_counter()
        path = Path(path)
        name = name or path.name
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            raise AppInputError(f"{name}: {path.stat().st_size // 2**20} MB is too large for an inversion file")
        data = path.read_bytes()
        key = artifact_key(data, self.fingerprint)
        entry = self.cache.get(key)
        if entry is not None:
            return InversionResult(entry, True, time.perf_counter() - started)
        try:
            inversion = Inversion.load(path)
        except NtiError as error:  # its message names the temporary upload: name the user's file
            raise type(error)(_renamed(str(error), path, name)) from None
        check_compatible(self.pipeline, inversion, name=name)
        with self.lock:
            source = inversion.source_latent.unsqueeze(0).to(self.pipeline.vae.device)
            input_image = to_pil(vae_codec.decode(self.pipeline.vae, source)[0])
            reconstruction = reconstruct(self.pipeline, inversion, guidance_scale=inversion.guidance_scale)
        entry = self.cache.put(key, inversion, input_image, reconstruction)
        return InversionResult(entry, False, time.perf_counter() - started)

    def entry(self, key: Optional[str]) -> CachedInversion:
        """The session's inversion by its key; `AppInputError` when there is none yet."""
        entry = self.cache.get(key) if key else None
        if entry is None:
            raise AppInputError("no inversion yet: invert an image (or upload an inversion file) first")
        return entry

    # ------------------------------------------------------------------------------ edit
    def edit(self, key: Optional[str], request: EditRequest) -> EditResult:
        """Edits the inversion of `key` as `request` says (one image per target prompt).

        Raises:
            `AppInputError` naming what the request's editor cannot edit: an EDICT inversion (its
            edits are the prompts alone), another method or model the editor refuses, a target
            Pix2Pix-Zero cannot edit towards.
        """
        started = time.perf_counter()
        entry = self.entry(key)
        inversion, tokenizer = entry.inversion, self.pipeline.tokenizer
        spec = EditSpec.from_dict(request.spec(inversion.prompt, tokenizer), "app")
        settings = spec.editor_settings()
        prompts = spec.all_prompts(inversion.prompt)
        method = method_of(inversion)
        if settings is not None:
            if not method.edits_under_control:
                raise AppInputError(
                    f"the {settings.label} editor cannot edit {method.label} inversions: {method.label} edits with "
                    "the prompts alone, as its authors' code does; pick Prompt-to-Prompt (a prompt swap), or invert "
                    "the image with another method"
                )
            controller, store = None, AttentionStore()
        elif method.edits_under_control:
            controller = spec.controller(prompts, tokenizer)
            store = controller.new_store()
        else:  # EDICT edits as its authors' code does: the prompts alone
            controller, store = None, AttentionStore()
        w = inversion.guidance_scale if request.guidance_scale is None else request.guidance_scale
        with self.lock, torch.no_grad():
            try:
                latents = edit_latents(
                    self.pipeline, inversion, prompts, controller=controller, guidance_scale=w,
                    attention_store=store, editor=settings,
                )
            except ValueError as error:
                if settings is None:
                    raise
                # The editor refuses this edit (the inversion's method, the model, the prompts): say why.
                raise AppInputError(" ".join(str(error).split())) from None
            edits = [to_pil(image) for image in vae_codec.decode(self.pipeline.vae, latents[1:])]
        # Pix2Pix-Zero's maps are its caption's (the source prompt unless one is given).
        attention_prompt = getattr(settings, "caption", None) or prompts[0]
        attention = None
        if store.sums:  # Plug-and-Play records none
            attention = cross_attention_picture(store, tokenizer, attention_prompt, columns=ATTENTION_COLUMNS)
        grid = labelled_grid(
            [entry.input_image, entry.reconstruction, *edits], ["input", "reconstruction", *prompts[1:]]
        )
        if settings is not None:
            kind = EDITOR_LABELS[settings.name]
        elif controller is None:
            kind = f"prompt swap ({method.label} edits without attention control)"
        else:
            kind = request.resolved_kind(inversion.prompt) + (" + reweight" if request.reweights else "")
        return EditResult(kind, prompts, edits, grid, attention, time.perf_counter() - started, attention_prompt)


def _renamed(message: str, path: str | Path, name: str) -> str:
    """`message` with the file `path` called `name`: where a message names it ("PATH: ...") and where PIL's
    does ("... file 'PATH'"), in each way the path may have been written.

    Args:
        message (`str`): an error's message.
        path (`str` or `Path`): the file it names.
        name (`str`): what to call the file instead.
    """
    for written in sorted({str(path), str(Path(path)), str(Path(path).resolve())}, key=len, reverse=True):
        message = message.replace(f"{written}: ", f"{name}: ").replace(f"'{written}'", f"'{name}'")
    return message
