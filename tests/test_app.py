"""`nti app` through its HTTP API (`gradio_client`), as a program or a second browser would use it.

One app is served for the module (the `shapes` model at T = 10, N = 5, a fresh cache folder);
each test opens its own client, that is its own browser session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason='the app needs its extra: pip install -e ".[app]"')
from app_server import (  # noqa: E402
    BLUE_PROMPT,
    DEMO_IMAGE,
    DEMO_PROMPT,
    INNER_STEPS,
    STEPS,
    assert_recoloured,
    free_port,
    running_app,
)
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

import nti_lightning as nti  # noqa: E402
from nti_lightning.app import Editor, InversionCache  # noqa: E402
from nti_lightning.app.cli import AUTH_ENV, authentication, launch, make_page, parser  # noqa: E402
from nti_lightning.app.layout import Page, close  # noqa: E402
from nti_lightning.cli import main as nti_main  # noqa: E402
from nti_lightning.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, NtiError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with running_app(cache, tmp_path_factory.mktemp("downloads")) as served:
        yield served


def client(app) -> Client:
    return Client(app.url, verbose=False)


def invert(
    session: Client,
    image: Path = DEMO_IMAGE,
    prompt: str = DEMO_PROMPT,
    steps: int = STEPS,
    method: str = "null_text",
    inner_steps: int = INNER_STEPS,
):
    return session.predict(handle_file(str(image)), prompt, method, steps, inner_steps, 7.5, api_name="/invert")


def edit(
    session: Client,
    targets: str = BLUE_PROMPT,
    kind: str = "auto",
    reweights: str = "",
    blend: str = "circle",
    **editor,
):
    """The Edit button; `editor` names the editor and its settings (`editor="masactrl", start_step=4`)."""
    return session.predict(targets, kind, 0.8, 0.7, reweights, blend, 7.5, api_name="/edit", **editor)


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def cache_files(app) -> list[str]:
    return sorted(path.name for path in app.editor.cache.folder.iterdir())


def assert_cache_complete(app) -> None:
    """Every entry has its three files, every inversion loads, and no temporary file is left."""
    names = cache_files(app)
    assert not [name for name in names if name.startswith(".") or name.endswith(".tmp")], names
    keys = {name.split(".")[0] for name in names}
    for key in keys:
        assert {f"{key}.input.png", f"{key}.reconstruction.png", f"{key}.safetensors"} <= set(names), names
        nti.Inversion.load(app.editor.cache.folder / f"{key}.safetensors")


# ------------------------------------------------------------------------------ invert
def test_invert_then_the_same_image_comes_from_the_cache_without_a_unet_call(app):
    session = client(app)
    gallery, status, download = invert(session)
    assert [item["caption"] for item in gallery][:2] == ["input", gallery[1]["caption"]]
    assert gallery[1]["caption"].startswith("Null-text, ") and "dB" in status and "made in" in status
    downloaded = nti.Inversion.load(download)
    assert downloaded.prompt == DEMO_PROMPT and downloaded.num_inference_steps == STEPS
    assert Path(download).name == f"a-red-circle-on-a-green-background-null_text-T{STEPS}.safetensors"

    calls = app.unet_calls[0]
    started = time.perf_counter()
    _, status, again = invert(client(app))  # another session, the same image
    print(f"\ncache hit through the API: {time.perf_counter() - started:.3f} s")
    assert app.unet_calls[0] == calls, "a cache hit must not call the UNet"
    assert "from the cache" in status
    assert Path(again).read_bytes() == Path(download).read_bytes()

    # Across restarts: a new Editor on the same folder (nothing in memory) finds it too.
    editor = Editor(
        app.editor.pipeline, InversionCache(app.editor.cache.folder), accelerator="cpu", defaults=app.editor.defaults
    )
    result = editor.invert(DEMO_IMAGE, DEMO_PROMPT)
    assert result.cached and app.unet_calls[0] == calls
    assert result.entry.inversion.prompt == DEMO_PROMPT
    assert_cache_complete(app)


def test_methods_side_by_side(app):
    session = client(app)
    invert(session)
    gallery, status, _ = invert(session, method="ddim")
    captions = [item["caption"] for item in gallery]
    # The input, the method just run, then the others cached for this image, prompt and settings.
    assert captions[0] == "input" and captions[1].startswith("DDIM, ") and captions[2].startswith("Null-text, ")
    assert "**DDIM**" in status


# -------------------------------------------------------------------------------- edit
def test_edit_red_to_blue(app):
    session = client(app)
    invert(session)
    gallery, files, note = edit(session)
    captions = [item["caption"] for item in gallery]
    assert captions == ["input | reconstruction | edits", BLUE_PROMPT, f"cross-attention of '{DEMO_PROMPT}', per token"]
    assert note.startswith("**Replace**")
    edited = np.asarray(Image.open(gallery[1]["image"]).convert("RGB"), dtype=np.float64)
    assert edited.shape == (32, 32, 3)  # the model's own resolution, as shown and downloaded
    print(f"\nred -> blue through the API: {assert_recoloured(edited)}")
    names = [Path(path).name for path in files]
    assert names == ["1-a-blue-circle-on-a-green-background.png", "grid.png", "attention.png"]
    assert Image.open(files[0]).size == (32, 32)  # the download is the model's own resolution

    # More words than the source: auto picks Refine; reweighting stays within the edit.
    gallery, _, note = edit(session, "a red circle on a green background, bright", blend="", reweights="bright=2")
    assert note.startswith("**Refine + reweight**") and len(gallery) == 3


def test_the_editor_choice(app):
    """MasaCtrl, Plug-and-Play and Pix2Pix-Zero beside Prompt-to-Prompt: each with its own controls,
    shown alone; an edit by each; their bad settings and the edits they cannot make are messages."""
    [radio] = [block for block in app.blocks.blocks.values() if getattr(block, "elem_id", None) == "editor"]
    assert radio.label == "Editor" and radio.value == "p2p"
    assert radio.choices == [("Prompt-to-Prompt", "p2p"), ("MasaCtrl", "masactrl"), ("Plug-and-Play", "pnp"),
                             ("Pix2Pix-Zero", "p2p_zero")]
    # Shown: the kind, Prompt-to-Prompt's other controls, MasaCtrl's, Plug-and-Play's, Pix2Pix-Zero's.
    shown = {name: [update["visible"] for update in Page.editor_controls(name)] for _, name in radio.choices}
    assert shown == {"p2p": [True, True, False, False, False], "masactrl": [False, False, True, False, False],
                     "pnp": [False, False, False, True, False], "p2p_zero": [False, False, False, False, True]}

    session = client(app)
    invert(session)
    attention = f"cross-attention of '{DEMO_PROMPT}', per token"
    gallery, files, note = edit(session, editor="masactrl", start_step=4, start_layer=10)
    assert [item["caption"] for item in gallery] == ["input | reconstruction | edits", BLUE_PROMPT, attention]
    assert note.startswith("**MasaCtrl**, 1 edit(s)") and len(files) == 3
    gallery, files, note = edit(session, editor="pnp", feature_steps=0.8, attention_steps=0.5)
    assert [item["caption"] for item in gallery] == ["input | reconstruction | edits", BLUE_PROMPT]
    assert note.startswith("**Plug-and-Play**, 1 edit(s)") and "records no cross-attention maps" in note
    assert [Path(path).name for path in files] == ["1-a-blue-circle-on-a-green-background.png", "grid.png"]
    gallery, _, note = edit(session, editor="p2p_zero", guidance_amount=0.1, caption="a red circle")
    assert note.startswith("**Pix2Pix-Zero**")
    assert gallery[-1]["caption"] == "cross-attention of 'a red circle', per token"  # its caption's maps

    for call, message in (
        (lambda: edit(session, editor="magic"), "Editor must be one of p2p, masactrl, pnp, p2p_zero, got 'magic'"),
        (lambda: edit(session, editor="masactrl", start_step=51),
         "MasaCtrl start step must be a number between 0 and 50, got 51"),
        (lambda: edit(session, editor="masactrl", start_step=2.5),
         "MasaCtrl settings: start_step must be a whole number from 0 to 50, got 2.5"),
        (lambda: edit(session, DEMO_PROMPT, editor="p2p_zero"), "Pix2Pix-Zero edits along the difference"),
    ):
        with pytest.raises(AppError) as raised:
            call()
        assert str(raised.value).startswith(message), str(raised.value)
    gallery, _, note = edit(session)  # the session goes on, Prompt-to-Prompt by default
    assert gallery[1]["caption"] == BLUE_PROMPT and note.startswith("**Replace**")


# -------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def other_model_artifact(tmp_path_factory) -> Path:
    """An inversion made with `tiny` (the shapes of `shapes`, other weights)."""
    pipe = nti.load_pipeline("tiny")
    [inversion] = nti.invert(
        pipe, str(DEMO_IMAGE), DEMO_PROMPT, num_inference_steps=2, num_inner_steps=1, progress_bar=False
    )
    return inversion.save(tmp_path_factory.mktemp("tiny") / "tiny-inversion.safetensors")


def bad_files(folder: Path, other_model: Path) -> dict[str, Path]:
    notes = folder / "notes.txt"
    notes.write_text("not a picture")
    tiny = folder / "tiny.png"
    Image.new("RGB", (4, 4), "red").save(tiny)
    huge = folder / "huge.png"
    Image.new("1", (11_000, 10_000)).save(huge)  # 110 megapixels, a few kilobytes of PNG
    corrupt = folder / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return {"notes": notes, "tiny": tiny, "huge": huge, "corrupt": corrupt, "other_model": other_model}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Gradio opens the upload too
def test_bad_input_gets_a_message_and_the_app_keeps_serving(app, tmp_path, other_model_artifact):
    files = bad_files(tmp_path, other_model_artifact)
    fresh = client(app)
    with pytest.raises(AppError, match="no inversion yet: invert an image"):
        edit(fresh)

    session = client(app)
    invert(session)
    before = cache_files(app)
    cases = [
        (lambda: invert(session, files["notes"]), r"notes.txt: not a readable image"),
        (lambda: invert(session, files["huge"]), r"huge.png: 11000x10000 px is too large"),
        (lambda: invert(session, files["tiny"]), r"degenerate image \(4x4 px"),
        (lambda: invert(session, prompt="   "), r"the source prompt is empty"),
        (lambda: invert(session, steps=0), r"Steps \(T\) must be a number between 1 and 200, got 0"),  # out of range
        (lambda: edit(session, "  \n "), r"no target prompt"),
        (lambda: edit(session, blend="square"), r"LocalBlend word\(s\) 'square' in none of the prompts"),
        (lambda: edit(session, reweights="fluffy=2"), r"word 'fluffy' is not in prompt"),
        (lambda: edit(session, reweights="blue=lots"), r"the factor of 'blue' must be a number"),
        (lambda: edit(session, "a big blue circle on a green background", kind="replace", blend=""),
         r"Replace needs prompts with the same number of words"),
        (lambda: session.predict(handle_file(str(files["other_model"])), api_name="/load_inversion"),
         r"tiny-inversion.safetensors: made with 'tiny' .* but this model .* has other weights"),
        (lambda: session.predict(handle_file(str(files["corrupt"])), api_name="/load_inversion"),
         r"corrupt.safetensors: not a readable inversion file"),
    ]
    for index, (call, message) in enumerate(cases):
        with pytest.raises(AppError, match=message) as raised:
            call()  # answered with a message: the app serves on
        assert "Traceback" not in str(raised.value)
        if index % 4 == 3 or index == len(cases) - 1:
            # ...and a good request is served, with this session's inversion intact.
            gallery, _, note = edit(session)
            assert gallery[1]["caption"] == BLUE_PROMPT and note.startswith("**Replace**")
    assert cache_files(app) == before  # nothing of a refused input reaches the cache
    assert_cache_complete(app)


def test_messages_name_the_users_file_and_the_field(app, tmp_path, other_model_artifact):
    # Gradio keeps an upload as <its temporary folder>/<hash>/<name>: a message names the name alone.
    tiny, corrupt = tmp_path / "tiny (1).png", tmp_path / "corrupt (1).safetensors"
    Image.new("RGB", (1, 1), "red").save(tiny)
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    session = client(app)
    invert(session)
    cases = [
        (lambda: invert(session, tiny), "tiny (1).png: degenerate image (1x1 px; at least "),
        (lambda: session.predict(handle_file(str(corrupt)), api_name="/load_inversion"),
         "corrupt (1).safetensors: not a readable inversion file"),
        # What a program can send and the page cannot: out of a slider's range, not among a radio's choices.
        (lambda: invert(session, steps=-3), "Steps (T) must be a number between 1 and 200, got -3"),
        (lambda: invert(session, inner_steps=51), "Inner steps (N) must be a number between 1 and 50, got 51"),
        (lambda: invert(session, method="magic"), "Method must be one of null_text, "),
        (lambda: session.predict(BLUE_PROMPT, "auto", -3, 0.7, "", "", 7.5, api_name="/edit"),
         "Cross-attention replace steps must be a number between 0 and 1, got -3"),
        (lambda: session.predict(BLUE_PROMPT, "auto", 0.8, 0.7, "", "", 99, api_name="/edit"),
         "Guidance scale (w) must be a number between 0 and 15, got 99"),
        (lambda: session.predict(BLUE_PROMPT, "sideways", 0.8, 0.7, "", "", 7.5, api_name="/edit"),
         "Kind must be one of auto, replace, refine, got 'sideways'"),
    ]
    for call, message in cases:
        with pytest.raises(AppError) as raised:
            call()
        assert str(raised.value).startswith(message), str(raised.value)
        assert str(tmp_path) not in str(raised.value) and "gradio" not in str(raised.value)
    gallery, _, _ = edit(session)  # the session goes on
    assert gallery[1]["caption"] == BLUE_PROMPT


def test_an_uploaded_inversion_replaces_the_image(app):
    session = client(app)
    _, _, download = invert(session)
    gallery, status, _, prompt = session.predict(handle_file(download), api_name="/load_inversion")
    assert prompt == DEMO_PROMPT and [item["caption"] for item in gallery][0] == "input"
    assert "**Null-text**" in status
    gallery, _, _ = edit(session)
    assert gallery[1]["caption"] == BLUE_PROMPT


def test_cancel_stops_a_running_inversion_and_keeps_nothing(app):
    session = client(app)
    before = cache_files(app)
    # T = 200, N = 20 would take minutes on a CPU.
    job = session.submit(handle_file(str(DEMO_IMAGE)), DEMO_PROMPT, "null_text", 200, 20, 7.5, api_name="/invert")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = job.status().progress_data
        if progress and progress[0].desc and progress[0].desc.startswith("step "):
            break
        time.sleep(0.1)
    else:
        pytest.fail("no progress from the walk within a minute")
    assert "t = " in progress[0].desc and "iteration" in progress[0].desc, progress
    cancelled = time.monotonic()
    session.predict(api_name="/cancel")
    _, status, _ = job.result(timeout=60)
    assert status == "Inversion cancelled."
    # The model is free again at once: the next requests are served right after.
    invert(session)  # in the cache already
    edit(session)
    print(f"\ncancel to the next requests served: {time.monotonic() - cancelled:.2f} s")
    assert cache_files(app) == before
    assert_cache_complete(app)


# ------------------------------------------------------------------------ two users
def test_two_clients_at_once_each_get_their_own_inversion(app, tmp_path):
    from nti_lightning.demo.shapes import heldout_samples

    other = next(s for s in heldout_samples(64) if s.color == "yellow" and s.shape != "circle")
    other_image = tmp_path / "other.png"
    other.image.save(other_image)
    first, second = client(app), client(app)
    # Settings no test used before (and quick ones): both are real inversions; the second is
    # sent once the first runs, so it waits in the queue.
    jobs = [first.submit(handle_file(str(DEMO_IMAGE)), DEMO_PROMPT, "null_text", 10, 5, 7.5, api_name="/invert")]
    wait_until(lambda: jobs[0].status().code.name in ("PROGRESS", "PROCESSING"), "the first inversion to start")
    jobs.append(
        second.submit(handle_file(str(other_image)), other.caption, "null_text", 10, 5, 7.5, api_name="/invert")
    )
    places = []
    while not all(job.done() for job in jobs):
        status = jobs[1].status()
        if status.code.name == "IN_QUEUE" and status.rank is not None:
            places.append(status.rank)
        time.sleep(0.02)
    results = [job.result() for job in jobs]
    print(f"\nsecond client's places in the queue: {sorted(set(places))}")
    assert places and min(places) == 0, "the waiting client sees its place in the queue"
    assert f"*{DEMO_PROMPT}*" in results[0][1] and f"*{other.caption}*" in results[1][1]
    assert nti.Inversion.load(results[0][2]).prompt == DEMO_PROMPT
    assert nti.Inversion.load(results[1][2]).prompt == other.caption

    # Each session edits its own inversion, also when both edit at once.
    target = other.caption.replace(other.color, "blue", 1)
    edits = {}

    def run(name: str, session: Client, targets: str) -> None:
        edits[name] = edit(session, targets, blend="")

    threads = [threading.Thread(target=run, args=("first", first, BLUE_PROMPT)),
               threading.Thread(target=run, args=("second", second, target))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert edits["first"][0][-1]["caption"] == f"cross-attention of '{DEMO_PROMPT}', per token"
    assert edits["second"][0][-1]["caption"] == f"cross-attention of '{other.caption}', per token"
    assert edits["second"][0][1]["caption"] == target


# -------------------------------------------------------------------------- the command
def test_nti_app_without_gradio_says_how_to_install_it(tmp_path, nti_main, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    result = nti_main("app", "--cache-dir", "cache", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'nti: error: nti app needs Gradio: pip install -e ".[app]" (or pip install "nti-lightning[app]")'
    ]


def test_nti_app_option_mistakes_are_one_line(tmp_path, nti_main):
    result = nti_main("app", "--trainer.precision", "64", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("nti: error: nti app: argument --trainer.precision: invalid choice: '64'")
    for args, culprit in (
        (["--model.editor", "sdedit"], "argument --model.editor: invalid choice: 'sdedit'"),
        (["--model.editor_options", "{start"], "argument --model.editor_options: not JSON"),
        (["--model.editor", "masactrl", "--model.editor_options", '{"start_step": 60}'],
         "--model.editor_options: masactrl: start_step must be a whole number from 0 to 50, got 60"),
    ):
        result = nti_main("app", *args, cwd=tmp_path)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert culprit in line, line


def test_nti_app_starts_on_the_editor_it_is_given(tmp_path):
    args = parser().parse_args(["--model.editor", "masactrl", "--model.editor_options", '{"start_step": 6}',
                                "--cache-dir", str(tmp_path / "cache")])
    page = make_page(args, downloads=tmp_path / "downloads")
    assert page.edit_defaults.editor == "masactrl" and page.edit_defaults.editor_options == {"start_step": 6}
    blocks = page.build()
    [radio] = [block for block in blocks.blocks.values() if getattr(block, "label", None) == "Editor"]
    [step] = [block for block in blocks.blocks.values() if getattr(block, "label", None) == "MasaCtrl start step"]
    assert radio.value == "masactrl" and step.value == 6


# --------------------------------------------------------------------------- log-in
USERS = "# who may edit\nana:s3cret:with:colons\n\nbo:pw\n"


def users_file(folder: Path, text: str = USERS, mode: int = 0o600) -> Path:
    path = folder / "users"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_password_guards_the_page_and_its_api(app, tmp_path, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    port = free_port()
    args = parser().parse_args(["--port", str(port), "--auth-file", str(users_file(tmp_path))])
    auth = authentication(args)
    assert auth == [("ana", "s3cret:with:colons"), ("bo", "pw")]
    # The module's page (its model and cache) served a second time, as `nti app` serves it: behind the log-in.
    blocks = app.page.build().queue(default_concurrency_limit=1)
    launch(blocks, args, auth)
    url = f"http://127.0.0.1:{port}/"
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, verbose=False, auth=("ana", "s3cret"))
        # Not only the page: its API, called without the log-in's cookie, is refused too.
        import httpx

        fields = [None, BLUE_PROMPT, "auto", 0.8, 0.7, "", "", 7.5]
        refused = httpx.post(f"{url}gradio_api/call/edit", json={"data": fields})
        assert refused.status_code == 401, refused.text
        session = Client(url, verbose=False, auth=("ana", "s3cret:with:colons"))
        invert(session)
        gallery, _, note = edit(session)
        assert gallery[1]["caption"] == BLUE_PROMPT and note.startswith("**Replace**")
    finally:
        close(blocks)


def test_the_log_in_comes_from_a_private_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)

    def auth(*words: str, environ: dict[str, str] | None = None):
        return authentication(parser().parse_args(list(words)), environ or {})

    assert auth() is None  # this machine only: no log-in unless one is set
    assert auth("--host", "0.0.0.0", environ={AUTH_ENV: "ana:pw:1"}) == [("ana", "pw:1")]
    assert auth("--host", "::1") is None and auth("--host", "localhost") is None
    assert auth("--host", "0.0.0.0", "--share", "--no-auth") is None  # knowingly open
    open_file = users_file(tmp_path, mode=0o644)
    with pytest.raises(NtiError) as refused:
        auth("--auth-file", str(open_file))
    assert str(refused.value) == (f"--auth-file {open_file}: others than its owner may read or change it (mode 644); "
                                  f"the passwords in it must be the owner's alone: chmod 600 {open_file}")
    users_file(tmp_path, mode=0o640)
    with pytest.raises(NtiError, match=f"chmod 600 {open_file}"):
        auth("--auth-file", str(open_file))
    for text, culprit in (("ana:pw\nbo-without-a-password\n", "line 2: expected user:password"),
                          ("ana:\n", "line 1: expected user:password"), ("\n# nobody\n", "no user:password line")):
        with pytest.raises(NtiError, match=culprit) as bad:
            auth("--auth-file", str(users_file(tmp_path, text)))
        assert "bo-without" not in str(bad.value)  # a line that may hold a password is never repeated
    with pytest.raises(NtiError, match=f"{AUTH_ENV}: expected user:password"):
        auth(environ={AUTH_ENV: "ana"})
    with pytest.raises(NtiError, match="no such file"):
        auth("--auth-file", str(tmp_path / "nope"))
    with pytest.raises(NtiError, match="--no-auth, and a password in --auth-file"):
        auth("--no-auth", "--auth-file", str(users_file(tmp_path)))


@pytest.mark.parametrize("words, exposure", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 serves beyond this machine"),
    (["--share"], "--share serves on a public link"),
])
def test_serving_beyond_this_machine_without_a_password_is_refused(words, exposure, capsys, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with pytest.raises(SystemExit) as exited:
        nti_main(["app", *words])  # refused before any model loads
    assert exited.value.code == EXIT_USAGE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"nti: error: nti app: {exposure}, and no password is set: set one with --auth-file FILE "
                    f"(lines user:password, chmod 600 FILE) or {AUTH_ENV}=user:password in the environment, "
                    f"or pass --no-auth to serve without one")


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)])
def test_nti_app_stops_on_a_signal_with_its_status_after_closing_the_server(tmp_path, signum, status):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("NTI_DEBUG", AUTH_ENV)}, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "nti_lightning.cli", "app", "--port", str(port), "--cache-dir", str(tmp_path / "cache"),
         "--trainer.accelerator", "cpu", "--threads", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A job a shell started in the background inherits SIGINT ignored, and so would the app.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        ready = process.stdout.readline()  # the first line it prints, once it serves
        assert ready.startswith(f"nti app: ready on http://127.0.0.1:{port} "), (ready, process.stderr.read())
        assert Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/cancel") == ()  # it serves
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == f"nti app: stopped by {signal.Signals(signum).name}; the server is closed"
    assert "Traceback" not in stderr
    with pytest.raises(OSError):  # nothing serves on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
