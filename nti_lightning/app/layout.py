"""The page of `nti app`: Gradio Blocks over an `Editor`.

Invert (left): an image (upload, drop, paste, or the example) or an inversion file, its source
prompt, the method and settings; a progress bar fed by the walk, a cancel button, then the input
beside its reconstruction by every method cached for it (with PSNR) and the `.safetensors` file.
Edit (below): target prompts, the editor (Prompt-to-Prompt, MasaCtrl, Plug-and-Play or
Pix2Pix-Zero: each shows its own controls alone), for Prompt-to-Prompt Replace or Refine
(auto-picked, shown, overridable), the replace steps, word weights and LocalBlend words, and w;
a gallery (the input | reconstruction | edits grid, each edit, the source prompt's
cross-attention maps when the editor records them) and the files to download.

Every model call goes through one queue slot (`concurrency_id="model"`), so a waiting user sees
their place in the queue; each browser session keeps its own inversion (a `gr.State` holding its
cache key). A user's mistake is shown as a message on the page (`gr.Error`), never a traceback: it
names the file as the user's computer named it (never the server's temporary copy), and a field
by its label and range, also when a program sends a value the page itself cannot (through the API).
"""

import functools
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
from PIL import Image

from nti_lightning.app.cache import CachedInversion
from nti_lightning.app.editor import Cancelled, Editor
from nti_lightning.app.requests import (
    EDITOR_LABELS,
    KINDS,
    EditRequest,
    InversionSettings,
    editor_fields,
    kind_note,
)
from nti_lightning.editing.editors import EDITOR_SETTINGS, EDITORS, P2P
from nti_lightning.errors import NtiError
from nti_lightning.inversion.methods import METHODS, REGISTRY
from nti_lightning.training.progress import WalkProgress

log = logging.getLogger(__name__)

#: Seconds the files offered for download are kept in the app's own folder.
DOWNLOADS_KEPT_S = 3600
#: Largest upload the server takes (a 100-megapixel photo fits).
MAX_UPLOAD = "300mb"
#: Every model call shares this queue slot: one at a time on the accelerator.
MODEL_QUEUE = "model"
METHOD_NAMES = {name: method.label for name, method in REGISTRY.items()}

#: Pictures are shown at their own resolution, small ones (32 px with `shapes`) enlarged by the
#: browser pixel for pixel, not blurred.
CSS = (
    "#image img, #inversion img, #results img { image-rendering: pixelated; } "
    "#image img { width: 192px !important; height: 192px !important; object-fit: contain; }"
)

DESCRIPTION = """# Null-text Inversion editor
Invert a photo once (the slow part), then edit it with Prompt-to-Prompt, MasaCtrl, Plug-and-Play or
Pix2Pix-Zero as often as you like.
Inversions are kept on disk: the same image, prompt, model and settings are never inverted twice."""


def launch_options() -> dict[str, Any]:
    """`Blocks.launch` keywords of the app: the system's fonts (the page fetches nothing from the
    internet), no server-side rendering process, Gradio's banner and analytics off."""
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return {"theme": theme, "ssr_mode": False, "quiet": True, "footer_links": ["api"], "max_file_size": MAX_UPLOAD}


class Upload(str):
    """The server's path of an uploaded file (it is that `str`), with the name the file had on the user's computer.

    Gradio keeps an upload as `<its temporary folder>/<hash>/<name stripped of some characters>`: a message about
    the file names `original_name` instead.

    Args:
        path (`str`): the server's copy.
        original_name (`str`, *optional*): the name the user's file had; the copy's own name when unknown.
    """

    original_name: str

    def __new__(cls, path: str, original_name: Optional[str] = None) -> "Upload":
        upload = super().__new__(cls, path)
        upload.original_name = original_name or Path(path).name
        return upload


def upload_name(path: Optional[str]) -> Optional[str]:
    """The name to show for the uploaded file at `path`: its `Upload.original_name`, else the file's own name.

    Args:
        path (`str`, *optional*): a handler's file argument (an `Upload` when the component was made by `Page.build`).
    """
    if not path:
        return None
    return getattr(path, "original_name", None) or Path(path).name


def close(blocks: gr.Blocks) -> None:
    """Closes a launched `blocks`: its server, its queue and its `--share` tunnel (which `Blocks.close` leaves open).

    Args:
        blocks (`gr.Blocks`): a launched Blocks.
    """
    from gradio.tunneling import CURRENT_TUNNELS

    blocks.close(verbose=False)
    for tunnel in list(CURRENT_TUNNELS):
        tunnel.kill()


def shown_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a handler; a user's mistake becomes a message on the page, anything else is logged
    and reported in one line. The app goes on serving either way."""

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (NtiError, ValueError, OSError) as error:  # the package's messages name the culprit
            raise gr.Error(" ".join(str(error).split()), print_exception=False) from None
        except Exception as error:
            log.exception("nti app: %s failed", fn.__name__)
            raise gr.Error(
                f"unexpected error ({type(error).__name__}); the server's log has the details", print_exception=False
            ) from None

    return handler


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of `text`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


class Page:
    """The page's handlers, around one `Editor`.

    Args:
        editor (`Editor`): the model, cache and lock.
        edit_defaults (`EditRequest`, *optional*): the edit fields' starting values.
        example (`(str, str)`, *optional*): an example image path and its prompt.
        downloads (`str` or `Path`, *optional*): where files offered for download are put.
    """

    def __init__(
        self,
        editor: Editor,
        edit_defaults: Optional[EditRequest] = None,
        example: Optional[tuple[str, str]] = None,
        downloads: Optional[str | Path] = None,
    ) -> None:
        self.editor = editor
        self.edit_defaults = edit_defaults or EditRequest(targets=[])
        self.example = example
        self.downloads = Path(downloads or tempfile.mkdtemp(prefix="nti-app-"))
        self._cancels: dict[str, threading.Event] = {}
        self._cancels_lock = threading.Lock()

    # -------------------------------------------------------------------------- helpers
    def _cancel_event(self, request: Optional[gr.Request]) -> threading.Event:
        """A fresh cancel flag for the session's new inversion."""
        event = threading.Event()
        with self._cancels_lock:
            self._cancels[_session(request)] = event
        return event

    def _folder(self) -> Path:
        """A new folder for the files of one answer (Gradio copies them into its own cache, so
        folders older than an hour are removed on the way)."""
        for old in self.downloads.iterdir():
            try:
                if old.is_dir() and time.time() - old.stat().st_mtime > DOWNLOADS_KEPT_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(dir=self.downloads))

    def _offer(self, source: Path, name: str) -> str:
        """A copy of `source` named `name`, for the page to offer."""
        return str(shutil.copyfile(source, self._folder() / name))

    def _offer_image(self, image: Image.Image, folder: Path, name: str) -> str:
        path = folder / name
        image.save(path, format="PNG")
        return str(path)

    def _inversion_outputs(
        self, entry: CachedInversion, others: list[CachedInversion], cached: bool, seconds: float
    ) -> tuple:
        inversion = entry.inversion
        entries = [entry] + [other for other in others if other.key != entry.key]  # this method first
        # The cached files themselves: nothing to encode again on a cache hit.
        gallery = [(str(entry.input_path), "input")]
        gallery += [(str(e.reconstruction_path), _reconstruction_label(e)) for e in entries]
        psnr = f", reconstruction PSNR **{entry.psnr:.2f} dB**" if entry.psnr is not None else ""
        where = f"from the cache in {seconds:.2f} s" if cached else f"made in {seconds:.1f} s"
        status = (
            f"**{METHOD_NAMES.get(entry.method, entry.method)}** inversion of *{inversion.prompt}* "
            f"(T = {inversion.num_inference_steps}, w = {inversion.guidance_scale:g}){psnr}; {where}."
        )
        name = f"{slug(inversion.prompt)}-{entry.method}-T{inversion.num_inference_steps}.safetensors"
        return entry.key, gallery, status, self._offer(entry.path, name)

    # ------------------------------------------------------------------------- handlers
    def invert(
        self,
        image: Optional[str],
        prompt: Optional[str],
        method: str,
        steps: float,
        inner_steps: float,
        guidance_scale: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """Inverts the image (or finds it in the cache); the session's inversion becomes it."""
        defaults = self.editor.defaults
        settings = InversionSettings(
            method, steps, guidance_scale, inner_steps, defaults.early_stop_epsilon, defaults.learning_rate
        )
        cancel = self._cancel_event(request)
        progress(0.0, desc="preparing")

        def on_progress(walk: WalkProgress) -> None:
            if walk.stage == "pivot":
                progress(0.0, desc=f"DDIM inversion (the pivot, {walk.num_steps} steps)")
                return
            progress(
                walk.fraction,
                desc=(
                    f"step {walk.step + 1}/{walk.num_steps}, t = {walk.timestep}, "
                    f"iteration {walk.iteration}/{walk.num_inner_steps}"
                ),
            )

        try:
            result = self.editor.invert(image, prompt, settings, on_progress=on_progress, cancel=cancel,
                                        name=upload_name(image))
        except Cancelled:
            gr.Warning("The inversion was cancelled; nothing of it was kept.")
            return gr.skip(), gr.skip(), "Inversion cancelled.", gr.skip()
        return self._inversion_outputs(result.entry, self.editor.compare(result), result.cached, result.seconds)

    def cancel(self, request: gr.Request) -> None:
        """Stops the session's running inversion at its next inner iteration."""
        with self._cancels_lock:
            event = self._cancels.get(_session(request))
        if event is not None:
            event.set()

    def load_inversion(self, file: Optional[str]) -> tuple:
        """Takes an uploaded `.safetensors` inversion as the session's inversion."""
        if not file:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        result = self.editor.load_artifact(file, upload_name(file))
        key, gallery, status, download = self._inversion_outputs(result.entry, [], result.cached, result.seconds)
        return key, gallery, status, download, result.entry.inversion.prompt

    def edit(
        self,
        key: Optional[str],
        targets: Optional[str],
        kind: str,
        cross_replace_steps: float,
        self_replace_steps: float,
        reweights: Optional[str],
        blend_words: Optional[str],
        guidance_scale: float,
        editor: Optional[str] = P2P,
        start_step: Optional[float] = None,
        start_layer: Optional[float] = None,
        feature_steps: Optional[float] = None,
        attention_steps: Optional[float] = None,
        guidance_amount: Optional[float] = None,
        caption: Optional[str] = None,
    ) -> tuple:
        """Edits the session's inversion; the gallery gets the grid, each edit and the attention maps
        (when the editor records them). The settings of the editors not chosen are not read."""
        options = editor_fields(
            editor, start_step, start_layer, feature_steps, attention_steps, guidance_amount, caption
        )
        request = EditRequest.from_fields(
            targets, kind, cross_replace_steps, self_replace_steps, reweights, blend_words, guidance_scale,
            editor, options,
        )
        result = self.editor.edit(key, request)
        targets = result.prompts[1:]
        # Each picture is encoded once: the gallery shows the files offered for download.
        folder = self._folder()
        edits = [
            self._offer_image(image, folder, f"{k + 1}-{slug(target)}.png")
            for k, (image, target) in enumerate(zip(result.edits, targets))
        ]
        grid = self._offer_image(result.grid, folder, "grid.png")
        gallery = [(grid, "input | reconstruction | edits"), *zip(edits, targets)]
        files = [*edits, grid]
        kind = result.kind[:1].upper() + result.kind[1:]
        note = f"**{kind}**, {len(targets)} edit(s) in {result.seconds:.2f} s"
        if result.attention is not None:
            attention = self._offer_image(result.attention, folder, "attention.png")
            gallery.append((attention, f"cross-attention of '{result.attention_prompt}', per token"))
            files.append(attention)
        else:
            note += f"; {result.kind} records no cross-attention maps"
        return gallery, files, note

    @staticmethod
    def editor_controls(editor: Optional[str]) -> tuple:
        """Shows the chosen editor's controls alone: Prompt-to-Prompt's kind and its other
        controls, then MasaCtrl's, Plug-and-Play's and Pix2Pix-Zero's."""
        editor = editor or P2P
        return (
            gr.update(visible=editor == P2P),
            gr.update(visible=editor == P2P),
            *(gr.update(visible=editor == name) for name in EDITOR_SETTINGS),
        )

    # --------------------------------------------------------------------------- layout
    def build(self) -> gr.Blocks:
        """The Blocks of the page (then `.queue(...)` and `.launch(**launch_options())`, as `nti app` does)."""
        defaults, edit_defaults = self.editor.defaults, self.edit_defaults
        chosen = edit_defaults.editor
        # Each editor's sliders start at its defaults (with the starting request's options over its own).
        starts = {
            name: {**settings().options(), **(edit_defaults.editor_options if name == chosen else {})}
            for name, settings in EDITOR_SETTINGS.items()
        }
        with gr.Blocks(title="nti-lightning editor", analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as blocks:
            gr.HTML(f"<style>{CSS}</style>", padding=False)
            gr.Markdown(DESCRIPTION)
            key = gr.State(None)
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     format="png", elem_id="image")
                    _readable_images(image)  # and named as the user's file
                    prompt = gr.Textbox(
                        label="Source prompt",
                        placeholder="what the image shows, e.g. a red circle on a green background",
                        elem_id="prompt",
                    )
                    with gr.Accordion("Inversion settings", open=False):
                        method = gr.Radio(
                            list(METHODS),
                            value=defaults.method,
                            label="Method",
                            info=(
                                "null_text: the paper's; negative_prompt, ddim, direct, ddpm (edit-friendly DDPM), "
                                "proxnpi (ProxNPI) and edict (EDICT), with their authors' settings: the methods it is "
                                "compared with"
                            ),
                        )
                        steps = gr.Slider(
                            1,
                            max(200, defaults.num_inference_steps),
                            value=defaults.num_inference_steps,
                            step=1,
                            label="Steps (T)",
                        )
                        inner_steps = gr.Slider(
                            1,
                            max(50, defaults.num_inner_steps),
                            value=defaults.num_inner_steps,
                            step=1,
                            label="Inner steps (N)",
                        )
                        invert_w = gr.Slider(
                            0,
                            max(15, defaults.guidance_scale),
                            value=defaults.guidance_scale,
                            step=0.5,
                            label="Guidance scale (w)",
                        )
                    with gr.Row():
                        invert_button = gr.Button("Invert", variant="primary", elem_id="invert")
                        cancel_button = gr.Button("Cancel", elem_id="cancel")
                    artifact = gr.File(
                        label="...or an inversion file (.safetensors)", file_types=[".safetensors"], elem_id="artifact"
                    )
                    _named_uploads(artifact)
                    if self.example is not None:
                        gr.Examples([list(self.example)], inputs=[image, prompt], label="Example")
                with gr.Column():
                    inversion_gallery = gr.Gallery(label="Input and reconstructions", columns=4, format="png",
                                                   object_fit="contain", elem_id="inversion")
                    status = gr.Markdown("Invert an image to start.", label="Status", elem_id="status")
                    download = gr.File(label="Inversion (.safetensors)", interactive=False, elem_id="download")
            gr.Markdown("## Edit")
            with gr.Row():
                with gr.Column(scale=2):
                    targets = gr.Textbox(
                        label="Target prompts, one per line",
                        lines=3,
                        elem_id="targets",
                        placeholder="the source prompt with words changed, e.g. a blue circle on a green background",
                    )
                    editor = gr.Radio(
                        [(EDITOR_LABELS[name], name) for name in EDITORS],
                        value=chosen,
                        label="Editor",
                        info=(
                            "Prompt-to-Prompt: the kind, replace steps, word weights and LocalBlend words; MasaCtrl, "
                            "Plug-and-Play and Pix2Pix-Zero: their own settings, shown when picked"
                        ),
                        elem_id="editor",
                    )
                    with gr.Row():
                        kind = gr.Radio(list(KINDS), value=edit_defaults.kind, label="Kind", elem_id="kind",
                                        visible=chosen == P2P)
                        note = gr.Markdown(
                            kind_note(None, None, edit_defaults.kind, chosen), label="Kind used", elem_id="kind-note"
                        )
                    with gr.Column(visible=chosen == P2P, elem_id="p2p-settings") as p2p_settings:
                        cross = gr.Slider(
                            0, 1, value=edit_defaults.cross_replace_steps, step=0.05,
                            label="Cross-attention replace steps",
                        )
                        self_ = gr.Slider(
                            0, 1, value=edit_defaults.self_replace_steps, step=0.05,
                            label="Self-attention replace steps",
                        )
                        reweights = gr.Textbox(
                            "", label="Word weights", placeholder="word=factor, e.g. fluffy=2, red=0.5",
                            elem_id="reweights",
                        )
                        blend = gr.Textbox(
                            "",
                            label="LocalBlend words",
                            placeholder="words whose region may change, e.g. circle",
                            elem_id="blend",
                        )
                    with gr.Column(visible=chosen == "masactrl", elem_id="masactrl-settings") as masactrl_settings:
                        start_step = gr.Slider(
                            0, 50, value=starts["masactrl"]["start_step"], step=1, label="MasaCtrl start step",
                            info="the first step (of 50, scaled to T) whose self-attention reads the source's",
                        )
                        start_layer = gr.Slider(
                            0, 16, value=starts["masactrl"]["start_layer"], step=1, label="MasaCtrl start layer",
                            info="the first self-attention layer (of 16) that reads the source's",
                        )
                    with gr.Column(visible=chosen == "pnp", elem_id="pnp-settings") as pnp_settings:
                        feature_steps = gr.Slider(
                            0, 1, value=starts["pnp"]["feature_steps"], step=0.05,
                            label="Plug-and-Play feature steps",
                            info="share of the steps (the first) with the source's features injected",
                        )
                        attention_steps = gr.Slider(
                            0, 1, value=starts["pnp"]["attention_steps"], step=0.05,
                            label="Plug-and-Play attention steps",
                            info="share of the steps (the first) with the source's self-attention injected",
                        )
                    with gr.Column(visible=chosen == "p2p_zero", elem_id="p2p-zero-settings") as p2p_zero_settings:
                        guidance_amount = gr.Slider(
                            0, 1, value=starts["p2p_zero"]["guidance_amount"], step=0.01,
                            label="Pix2Pix-Zero guidance amount",
                            info="step size of the cross-attention guidance towards the source's maps",
                        )
                        caption = gr.Textbox(
                            starts["p2p_zero"]["caption"] or "",
                            label="Pix2Pix-Zero caption",
                            placeholder="the image's caption; empty: the source prompt",
                            elem_id="caption",
                        )
                    edit_w = gr.Slider(0, max(15, defaults.guidance_scale), value=defaults.guidance_scale, step=0.5,
                                       label="Guidance scale (w)")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                    _named_checks(method, steps, inner_steps, invert_w, kind, cross, self_, edit_w, editor,
                                  start_step, start_layer, feature_steps, attention_steps, guidance_amount)
                with gr.Column(scale=3):
                    results = gr.Gallery(
                        label="Edits", columns=3, format="png", object_fit="contain", elem_id="results"
                    )
                    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="files")

            inversion_outputs = [key, inversion_gallery, status, download]
            invert_event = invert_button.click(
                shown_errors(self.invert), [image, prompt, method, steps, inner_steps, invert_w], inversion_outputs,
                api_name="invert", concurrency_id=MODEL_QUEUE, concurrency_limit=1,
            )
            cancel_button.click(
                shown_errors(self.cancel), None, None, cancels=[invert_event], queue=False, api_name="cancel"
            )
            artifact.upload(
                shown_errors(self.load_inversion), [artifact], [*inversion_outputs, prompt],
                api_name="load_inversion", concurrency_id=MODEL_QUEUE, concurrency_limit=1,
            )
            edit_button.click(
                shown_errors(self.edit),
                [key, targets, kind, cross, self_, reweights, blend, edit_w,
                 editor, start_step, start_layer, feature_steps, attention_steps, guidance_amount, caption],
                [results, files, note],
                api_name="edit",
                concurrency_id=MODEL_QUEUE,
                concurrency_limit=1,
            )
            gr.on([targets.change, kind.change, prompt.change, editor.change], kind_note,
                  [prompt, targets, kind, editor], note, queue=False, show_progress="hidden",
                  api_visibility="private")
            editor.change(
                self.editor_controls, [editor],
                [kind, p2p_settings, masactrl_settings, pnp_settings, p2p_zero_settings],
                queue=False, show_progress="hidden", api_visibility="private",
            )
        return blocks


def _reconstruction_label(entry: CachedInversion) -> str:
    name = METHOD_NAMES.get(entry.method, entry.method)
    return f"{name}, {entry.psnr:.2f} dB" if entry.psnr is not None else name


def _session(request: Optional[gr.Request]) -> str:
    return str(getattr(request, "session_hash", None) or "")


def _readable_images(component: gr.Image) -> None:
    """Makes the image field say which upload is not a readable image (Gradio opens it before
    any handler runs), instead of failing without a message."""
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            path = preprocess(payload)
        except Exception as error:  # PIL cannot identify it, or refuses its size
            name = getattr(payload, "orig_name", None) or "the upload"
            reason = (
                "too large to decode" if isinstance(error, Image.DecompressionBombError) else "not a readable image"
            )
            raise gr.Error(f"{name}: {reason} (PNG, JPEG, WebP, ... expected)", print_exception=False) from None
        return Upload(path, getattr(payload, "orig_name", None)) if isinstance(path, str) else path

    component.preprocess = checked  # type: ignore[method-assign]


def _named_uploads(component: gr.File) -> None:
    """Makes a single-file field hand its handler an `Upload`: the path, and the name the user's file had."""
    preprocess = component.preprocess

    def named(payload: Any) -> Any:
        path = preprocess(payload)
        return Upload(path, getattr(payload, "orig_name", None)) if isinstance(path, str) else path

    component.preprocess = named  # type: ignore[method-assign]


def _named_checks(*components: gr.Slider | gr.Radio) -> None:
    """Makes a slider's or a radio's refusal name the field and what it takes.

    The page's own controls cannot leave their range, but the API takes any value, and Gradio's refusal
    ("Value -3 is less than minimum value 1") names no field.

    Args:
        components (`gr.Slider` or `gr.Radio`): the fields, each with its `label`.
    """
    for component in components:
        preprocess = component.preprocess
        if isinstance(component, gr.Slider):
            takes = f"a number between {component.minimum:g} and {component.maximum:g}"
        else:
            takes = "one of " + ", ".join(str(value) for _, value in component.choices)

        def checked(payload: Any, preprocess: Callable[[Any], Any] = preprocess, label: Any = component.label,
                    takes: str = takes) -> Any:
            try:
                return preprocess(payload)
            except Exception:  # out of range, not a number, not a choice
                raise gr.Error(f"{label} must be {takes}, got {payload!r}", print_exception=False) from None

        component.preprocess = checked  # type: ignore[method-assign]
