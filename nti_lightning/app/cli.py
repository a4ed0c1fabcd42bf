"""`nti app`: the editor in the browser.

    nti app                                        # shapes, on http://127.0.0.1:7860
    nti app --model.pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 --trainer.precision bf16-mixed
    NTI_APP_AUTH=ana:s3cret nti app --host 0.0.0.0 --port 8080 --cache-dir /data/nti-cache
    nti app --share --auth-file ~/.nti-app-users   # a temporary public link through Gradio, with a log-in
    nti app --model.editor masactrl --model.editor_options '{"start_step": 4}'   # the page starts on MasaCtrl

Options that `nti fit` and `nti predict` also take have their names (`--model.*`, `--trainer.*`);
the `--model.*` settings are the page's starting values.

The page asks for a user and password (Gradio's log-in page) when `--auth-file FILE` (lines
`user:password`, a file only its owner may read: `chmod 600 FILE`) or `NTI_APP_AUTH=user:password`
in the environment gives one; never on the command line, which every user of the machine sees in
`ps`. Serving beyond this machine (`--host` other than 127.0.0.1, localhost or ::1, or `--share`)
without a password is refused unless `--no-auth` says so.

It serves until interrupted: Ctrl-C (SIGINT) exits with status 130, SIGTERM with 143, each after
closing the server.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shlex
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Iterator, Mapping, Optional

from nti_lightning.errors import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    InputNotFoundError,
    NtiError,
    OptionError,
)

#: Where inversions are kept unless `--cache-dir` says otherwise.
DEFAULT_CACHE = "~/.cache/nti-lightning/app"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: The example offered on the page: the demo image of the README (held-out image 8 of `shapes`).
EXAMPLE_PROMPT = "a red circle on a green background"
EXAMPLE_INDEX = 8
#: The environment variable that may hold the log-in, `user:password` (an option would show it in `ps`).
AUTH_ENV = "NTI_APP_AUTH"
#: Host names only this machine reaches, beside the loopback addresses (127.0.0.0/8, ::1).
LOOPBACK_NAMES = ("localhost",)
#: How the refusal to serve without a password says to set one.
HOW_TO_AUTH = (f"set one with --auth-file FILE (lines user:password, chmod 600 FILE) or {AUTH_ENV}=user:password in "
               "the environment, or pass --no-auth to serve without one")


def _json_object(text: str) -> dict[str, Any]:
    """An option's JSON object (`--model.editor_options '{"start_step": 4}'`)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at column {error.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of settings is expected, got {text!r}")
    return value


class MissingExtraError(NtiError, ImportError):
    """The app's optional dependencies are not installed."""


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are `OptionError`s: `nti: error: <message>`, status 2, as every command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise OptionError(f"nti app: {message} (`nti app --help` lists the options)")


def parser() -> argparse.ArgumentParser:
    from nti_lightning.editing.editors import EDITORS
    from nti_lightning.inversion.methods import METHODS
    from nti_lightning.training.callback import SUPPORTED_PRECISIONS

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
    p.add_argument("--model.editor", dest="editor", choices=EDITORS, default="p2p",
                   help="the editor the page starts with (default p2p: Prompt-to-Prompt)")
    p.add_argument("--model.editor_options", dest="editor_options", type=_json_object, default={},
                   help='its starting settings as a JSON object, e.g. \'{"start_step": 4}\' for masactrl')
    p.add_argument("--trainer.precision", dest="precision", choices=SUPPORTED_PRECISIONS, default="32-true",
                   help="the inversion's precision, as in nti fit (16-mixed: CUDA only)")
    p.add_argument("--trainer.accelerator", dest="accelerator", choices=ACCELERATORS, default="auto",
                   help="where the model runs: auto (a GPU when there is one), cpu, gpu/cuda, mps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the model (default: OMP_NUM_THREADS when set, else every core but one, "
                        "which serves the page)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"where inversions are kept (default {DEFAULT_CACHE})")
    p.add_argument("--max-queue", type=int, default=64, help="users waiting at most (default 64)")
    p.add_argument("--auth-file", metavar="FILE", default=None,
                   help=f"log-in: lines user:password, a file only its owner may read (chmod 600 FILE); "
                        f"or {AUTH_ENV}=user:password in the environment (default: none)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve beyond this machine (--host, --share) without a password, knowingly (default: refused)")
    return p


class Terminated(SystemExit):
    """SIGTERM arrived: `nti app` stops with status 143 (`EXIT_SIGTERM`), after closing its server."""

    def __init__(self) -> None:
        super().__init__(EXIT_SIGTERM)


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    """The SIGTERM handler: stops the main thread where it is, as Ctrl-C does, so that `finally` closes the server
    (Python's default action would end the process at once, with the port and the queue left as they were)."""
    raise Terminated()


def is_loopback(host: str) -> bool:
    """Whether `host` (`--host`) is reached from this machine only: "localhost" or a loopback address.

    Args:
        host (`str`): a host name or an IP address, IPv6 with or without brackets.
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to any interface
        return False


def parse_credentials(text: str, where: str) -> tuple[str, str]:
    """`(user, password)` from "user:password"; `OptionError` naming `where`, never the text (it holds a password).

    Args:
        text (`str`): one "user:password"; the password is what follows the first colon, colons included.
        where (`str`): where `text` came from, e.g. "NTI_APP_AUTH" or "users.txt, line 3".
    """
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise OptionError(f"{where}: expected user:password, with neither empty")
    return user.strip(), password


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """The `(user, password)` pairs of an `--auth-file`: one `user:password` a line; blank lines and lines starting
    with "#" are skipped.

    Args:
        path (`str` or `Path`): the file; `~` is expanded.

    Raises:
        `InputNotFoundError`: no such file. `OptionError`: it is not a plain file, others than its owner may read or
        write it (the message gives the fix, `chmod 600 FILE`), or a line is not `user:password`.
    """
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputNotFoundError(f"--auth-file {path}: no such file") from None
    if not stat.S_ISREG(mode):
        raise OptionError(f"--auth-file {path}: not a file")
    # Windows has no such permission bits (st_mode always reads 0o666 there): its ACLs are the user's to set.
    if os.name == "posix" and mode & 0o077:
        raise OptionError(f"--auth-file {path}: others than its owner may read or change it "
                          f"(mode {stat.S_IMODE(mode):o}); the passwords in it must be the owner's alone: "
                          f"chmod 600 {shlex.quote(str(path))}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise OptionError(f"--auth-file {path}: cannot read it ({type(error).__name__})") from None
    pairs = [parse_credentials(line.strip(), f"--auth-file {path}, line {number}")
             for number, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not pairs:
        raise OptionError(f"--auth-file {path}: no user:password line in it")
    return pairs


def authentication(args: argparse.Namespace,
                   environ: Optional[Mapping[str, str]] = None) -> Optional[list[tuple[str, str]]]:
    """The log-ins of the page (`Blocks.launch(auth=...)`), or None for a page open to whoever reaches it.

    Args:
        args (`argparse.Namespace`): `parser()`'s: `auth_file`, `no_auth`, `host`, `share`.
        environ (`Mapping[str, str]`, *optional*): where `NTI_APP_AUTH` is read; `os.environ` by default.

    Raises:
        `OptionError`: a bad `--auth-file` or `NTI_APP_AUTH`; `--no-auth` beside a password; or the page would be
        served beyond this machine (`--host` not a loopback address, `--share`) without a password and without
        `--no-auth`, naming both ways to set one.
    """
    environ = os.environ if environ is None else environ
    credentials = read_auth_file(args.auth_file) if args.auth_file else []
    if environ.get(AUTH_ENV):
        credentials.append(parse_credentials(environ[AUTH_ENV], AUTH_ENV))
    if credentials and args.no_auth:
        given = "--auth-file" if args.auth_file else f"{AUTH_ENV} (set in the environment)"
        raise OptionError(f"nti app: --no-auth, and a password in {given}: drop one of them")
    exposed = ([] if is_loopback(args.host) else [f"--host {args.host} serves beyond this machine"])
    exposed += ["--share serves on a public link"] if args.share else []
    if exposed and not credentials and not args.no_auth:
        raise OptionError(f"nti app: {' and '.join(exposed)}, and no password is set: {HOW_TO_AUTH}")
    return credentials or None


def require_gradio() -> Any:
    """`gradio`, or `MissingExtraError` saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise MissingExtraError(
            'nti app needs Gradio: pip install -e ".[app]" (or pip install "nti-lightning[app]")'
        ) from None
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
        raise OptionError(
            f"--trainer.precision 16-mixed needs a CUDA device, not {accelerator}; use bf16-mixed or 32-true"
        )
    return accelerator, accelerator


def set_threads(threads: Optional[int]) -> int:
    """Sets torch's CPU threads for `--threads`; returns the number used.

    The page's server needs a core of its own: with every core computing, the threads of a CPU
    model wait on each other whenever the server runs (on 2 cores, an inversion took 2.4 times
    as long with 2 threads as with 1; BENCHMARKS.md).
    """
    import torch

    if threads is None:
        threads = (
            int(os.environ["OMP_NUM_THREADS"])
            if os.environ.get("OMP_NUM_THREADS", "").isdigit()
            else max(1, (os.cpu_count() or 2) - 1)
        )
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

    settings = InversionSettings(
        args.method, args.steps, args.guidance_scale, args.inner_steps, args.epsilon, args.learning_rate
    ).checked()
    for name in ("cross_replace_steps", "self_replace_steps"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise OptionError(f"--model.{name} must be a fraction between 0 and 1, got {getattr(args, name)}")
    if args.editor != "p2p":
        from nti_lightning.editing.editors import editor_settings

        try:
            editor_settings(args.editor, args.editor_options)
        except ValueError as error:
            raise OptionError(f"--model.editor_options: {error}") from None
    elif args.editor_options:
        raise OptionError("--model.editor_options: Prompt-to-Prompt's settings are the --model.*_replace_steps options")
    edit_defaults = EditRequest(
        targets=[], cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps,
        editor=args.editor, editor_options=args.editor_options,
    )
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


def launch(blocks: Any, args: argparse.Namespace, auth: Optional[list[tuple[str, str]]] = None) -> None:
    """Serves `blocks` as `args` say (`--host`, `--port`, `--share`), behind Gradio's log-in page when `auth` is given;
    returns once it is served.

    Args:
        blocks (`gradio.Blocks`): `build(args)`'s.
        args (`argparse.Namespace`): `parser()`'s.
        auth (`list[tuple[str, str]]`, *optional*): `authentication(args)`'s (user, password) pairs; None: no log-in.

    Raises:
        `OptionError`: the port is taken, or the address is not this machine's.
    """
    from nti_lightning.app.layout import launch_options

    try:
        blocks.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                      auth=auth, **launch_options())
    except OSError as error:  # the port is taken, the address is not this machine's
        raise OptionError(f"cannot serve on {args.host}:{args.port}: {error}") from None


def serve_until_stopped(blocks: Any) -> int:
    """Waits while `blocks` serves, until SIGINT (Ctrl-C) or SIGTERM; closes the server; returns the exit status.

    Gradio's own `block_thread` swallows Ctrl-C (the process then exited 0, as if it had ended normally).

    Args:
        blocks (`gradio.Blocks`): a launched `Blocks`.

    Returns:
        `int`: `EXIT_SIGINT` (130) or `EXIT_SIGTERM` (143).
    """
    from nti_lightning.app.layout import close

    try:
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        status, name = EXIT_SIGINT, "SIGINT"
    except Terminated:
        status, name = EXIT_SIGTERM, "SIGTERM"
    finally:
        close(blocks)
    print(f"nti app: stopped by {name}; the server is closed", file=sys.stderr, flush=True)
    return status


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """While in the block, SIGTERM raises `Terminated` in the main thread (as Ctrl-C raises `KeyboardInterrupt`);
    the previous handler is restored after. Elsewhere than in the main thread, where Python sets no handler,
    it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[list[str]] = None) -> None:
    """Runs `nti app` until interrupted; raises `SystemExit` with 130 (SIGINT) or 143 (SIGTERM) after closing the
    server (SIGTERM while the model loads: 143 at once, nothing is served yet).

    Args:
        argv (`list[str]`, *optional*): the words after `nti app`; the command line's by default.
    """
    args = parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise OptionError(f"--port must be between 1 and 65535, got {args.port}")
    auth = authentication(args)  # before the model loads: a refusal comes at once
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unasked
    with sigterm_stops():
        started = time.perf_counter()
        blocks = build(args)
        launch(blocks, args, auth)
        login = f", log-in for {len(auth)} user(s)" if auth else ""
        print(f"nti app: ready on http://{args.host}:{args.port} ({args.pretrained}, "
              f"{time.perf_counter() - started:.1f} s{login})", flush=True)
        if blocks.share_url:
            print(f"nti app: shared on {blocks.share_url}", flush=True)
        status = serve_until_stopped(blocks)
    raise SystemExit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
