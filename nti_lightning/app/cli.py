"""`nti app`: the editor in the browser.

    nti app                                        # shapes, on http://127.0.0.1:7860
    nti app --model.pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 --trainer.precision bf16-mixed
    nti app --host 0.0.0.0 --port 8080 --cache-dir /data/nti-cache
    nti app --share                                # a temporary public link through Gradio

Options that `nti fit` and `nti predict` also take have their names (`--model.*`, `--trainer.*`);
the `--model.*` settings are the page's starting values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from nti_lightning.errors import NtiError, OptionError

#: Where inversions are kept unless `--cache-dir` says otherwise.
DEFAULT_CACHE = "~/.cache/nti-lightning/app"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: The example offered on the page: the demo image of the README (held-out image 8 of `shapes`).
EXAMPLE_PROMPT = "a red circle on a green background"
EXAMPLE_INDEX = 8


class MissingExtraError(NtiError, ImportError):
    """The app's optional dependencies are not installed."""


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are `OptionError`s: `nti: error: <message>`, status 2, as every command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise OptionError(f"nti app: {message} (`nti app --help` lists the options)")


def parser() -> argparse.ArgumentParser:
    from nti_lightning.training.callback import SUPPORTED_PRECISIONS
    from nti_lightning.training.module import METHODS

    p = _Parser(prog="nti app", description="Invert a photo once and edit it live in the browser (Gradio).")
    p.add_argument("--model.pretrained", dest="pretrained", default="shapes",
                   help="hub id, diffusers folder, .safetensors checkpoint or built-in name (default: shapes, offline)")
    p.add_argument("--model.num_inference_steps", dest="steps", type=int, default=50, help="T (default 50)")
    p.add_argument("--model.num_inner_steps", dest="inner_steps", type=int, default=10, help="N (default 10)")
    p.add_argument("--model.guidance_scale", dest="guidance_scale", type=float, default=7.5, help="w (default 7.5)")
    p.add_argument("--model.early_stop_epsilon", dest="epsilon", type=float, default=1e-5, help="ε (default 1e-5)")
    p.add_argument("--model.learning_rate", dest="learning_rate", type=float, default=1e-2, help="default 1e-2")
    p.add_argument("--model.method", dest="method", choices=METHODS, default="null_text")
    p.add_argument("--model.cross_replace_steps", dest="cross_replace_steps", type=float, default=0.8,
                   help="edits: share of the steps with cross-attention replaced (default 0.8)")
    p.add_argument("--model.self_replace_steps", dest="self_replace_steps", type=float, default=0.4,
                   help="edits: share of the steps with self-attention replaced (default 0.4)")
    p.add_argument("--trainer.precision", dest="precision", choices=SUPPORTED_PRECISIONS, default="32-true",
                   help="the inversion's precision, as in nti fit (16-mixed: CUDA only)")
    p.add_argument("--trainer.accelerator", dest="accelerator", choices=ACCELERATORS, default="auto",
                   help="where the model runs: auto (a GPU when there is one), cpu, gpu/cuda, mps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the model (default: OMP_NUM_THREADS when set, else every core but one, "
                        "which serves the page)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"where inversions are kept (default {DEFAULT_CACHE})")
    p.add_argument("--max-queue", type=int, default=64, help="users waiting at most (default 64)")
    return p


def require_gradio() -> Any:
    """`gradio`, or `MissingExtraError` saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise MissingExtraError('nti app needs Gradio: pip install -e ".[app]" (or pip install "nti-lightning[app]")') from None
    return gradio


def device_for(accelerator: str, precision: str = "32-true") -> tuple[str, str]:
    """(torch device, Lightning accelerator) for `--trainer.accelerator` (and a precision it can run)."""
    import torch

    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise OptionError("--trainer.accelerator gpu: no CUDA device is available (use cpu or auto)")
    if precision == "16-mixed" and accelerator != "cuda":
        raise OptionError(f"--trainer.precision 16-mixed needs a CUDA device, not {accelerator}; use bf16-mixed or 32-true")
    return accelerator, accelerator


def set_threads(threads: Optional[int]) -> int:
    """Sets torch's CPU threads for `--threads`; returns the number used.

    The page's server needs a core of its own: with every core computing, the threads of a CPU
    model wait on each other whenever the server runs (on 2 cores, an inversion took 2.4 times
    as long with 2 threads as with 1; BENCHMARKS.md).
    """
    import torch

    if threads is None:
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else max(1, (os.cpu_count() or 2) - 1)
    if threads < 1:
        raise OptionError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def example_image(folder: Path) -> str:
    """The README's demo image, drawn by the `shapes` generator (no file needs to ship)."""
    from nti_lightning.demo.shapes import make_sample

    path = folder / "demo_red_circle.png"
    make_sample(EXAMPLE_INDEX, "heldout").image.save(path)
    return str(path)


def make_page(args: argparse.Namespace, downloads: Optional[Path] = None) -> Any:
    """Loads the model and returns the `Page` (its `Editor` at `.editor`) for `args` (`parser()`'s)."""
    require_gradio()
    from nti_lightning.app.cache import InversionCache
    from nti_lightning.app.editor import Editor
    from nti_lightning.app.layout import Page
    from nti_lightning.app.requests import EditRequest, InversionSettings
    from nti_lightning.models.loading import load_pipeline
    from nti_lightning.storage.atomic import ensure_folder

    settings = InversionSettings(args.method, args.steps, args.guidance_scale, args.inner_steps, args.epsilon, args.learning_rate).checked()
    for name in ("cross_replace_steps", "self_replace_steps"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise OptionError(f"--model.{name} must be a fraction between 0 and 1, got {getattr(args, name)}")
    edit_defaults = EditRequest(targets=[], cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps)
    device, accelerator = device_for(args.accelerator, args.precision)
    set_threads(args.threads)
    cache = InversionCache(args.cache_dir)
    pipeline = load_pipeline(args.pretrained).to(device)
    editor = Editor(pipeline, cache, precision=args.precision, accelerator=accelerator, defaults=settings)
    downloads = ensure_folder(downloads) if downloads else Path(tempfile.mkdtemp(prefix="nti-app-"))
    return Page(editor, edit_defaults, example=(example_image(downloads), EXAMPLE_PROMPT), downloads=downloads)


def build(args: argparse.Namespace, downloads: Optional[Path] = None) -> Any:
    """`make_page(args)`'s Blocks with the queue set up: one model call at a time, at most
    `--max-queue` waiting."""
    return make_page(args, downloads).build().queue(default_concurrency_limit=1, max_size=args.max_queue)


def main(argv: Optional[list[str]] = None) -> None:
    """Runs `nti app` until interrupted."""
    args = parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise OptionError(f"--port must be between 1 and 65535, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unasked
    started = time.perf_counter()
    blocks = build(args)
    from nti_lightning.app.layout import launch_options

    try:
        blocks.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, **launch_options())
    except OSError as error:  # the port is taken, the address is not this machine's
        raise OptionError(f"cannot serve on {args.host}:{args.port}: {error}") from None
    print(f"nti app: ready on http://{args.host}:{args.port} ({args.pretrained}, {time.perf_counter() - started:.1f} s)", flush=True)
    if blocks.share_url:
        print(f"nti app: shared on {blocks.share_url}", flush=True)
    try:
        blocks.block_thread()
    finally:
        blocks.close()


if __name__ == "__main__":
    main(sys.argv[1:])
