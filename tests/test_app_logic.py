"""The app's logic without a browser or Gradio: the cache, the page's fields, the `Editor`."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from app_server import BLUE_PROMPT, DEMO_IMAGE, DEMO_PROMPT
from PIL import Image

import nti_lightning as nti
from nti_lightning.app import (
    AppInputError,
    Cancelled,
    Editor,
    EditRequest,
    InversionCache,
    InversionSettings,
)
from nti_lightning.app.cache import inversion_key
from nti_lightning.app.requests import auto_kind, editor_fields, kind_note, parse_reweights
from nti_lightning.errors import NtiError


@pytest.fixture(scope="module")
def pipe():
    return nti.load_pipeline("shapes")


QUICK = InversionSettings(num_inference_steps=4, num_inner_steps=2)


def test_the_key_covers_pixels_prompt_model_and_settings():
    image = Image.open(DEMO_IMAGE).convert("RGB")
    settings = {**QUICK.invert_kwargs(), "precision": "32-true"}
    key = inversion_key(image, DEMO_PROMPT, "f" * 16, settings)
    assert key == inversion_key(image.copy(), DEMO_PROMPT, "f" * 16, dict(settings))
    pixels = np.asarray(image).copy()
    pixels[0, 0, 0] ^= 1
    others = [
        inversion_key(Image.fromarray(pixels), DEMO_PROMPT, "f" * 16, settings),
        inversion_key(image, BLUE_PROMPT, "f" * 16, settings),
        inversion_key(image, DEMO_PROMPT, "e" * 16, settings),
        inversion_key(image, DEMO_PROMPT, "f" * 16, {**settings, "method": "ddim"}),
        inversion_key(image, DEMO_PROMPT, "f" * 16, {**settings, "num_inference_steps": 5}),
        inversion_key(image, DEMO_PROMPT, "f" * 16, {**settings, "precision": "bf16-mixed"}),
    ]
    assert len({key, *others}) == 7


def test_the_page_fields_are_read_and_checked():
    assert parse_reweights(" fluffy=2, red = 0.5 ;") == {"fluffy": 2.0, "red": 0.5}
    for text, message in (
        ("fluffy", "word=factor"),
        ("a b=2", "word=factor"),
        ("x=y", "must be a number"),
        ("x=-1", "non-negative"),
    ):
        with pytest.raises(AppInputError, match=message):
            parse_reweights(text)
    assert auto_kind("a red circle", ["a blue circle", "a big circle"]) == "replace"
    assert auto_kind("a red circle", ["a big red circle"]) == "refine"
    assert kind_note("a red circle", "a big red circle", "auto") == "auto: **Refine** (the word counts differ)"
    assert kind_note("a red circle", "a big red circle", "replace") == "**Replace** (chosen)"
    request = EditRequest.from_fields(f"\n  {BLUE_PROMPT}  \n\n", "auto", 0.8, 0.7, "", "circle, square", 7.5)
    assert request.targets == [BLUE_PROMPT] and request.blend_words == ["circle", "square"]
    for fields, message in (
        (("  ",), "no target prompt"),
        ((BLUE_PROMPT, "sideways"), "edit kind must be one of"),
        ((BLUE_PROMPT, "auto", 1.5), "cross-attention replace steps must be a fraction"),
    ):
        with pytest.raises(AppInputError, match=message):
            EditRequest.from_fields(*fields)
    with pytest.raises(AppInputError, match="method must be one of"):
        InversionSettings(method="magic").checked()
    with pytest.raises(AppInputError, match="whole number"):
        InversionSettings(num_inference_steps=2.5).checked()


def test_a_failed_or_cancelled_inversion_leaves_nothing_in_the_cache(pipe, tmp_path, monkeypatch):
    editor = Editor(pipe, InversionCache(tmp_path / "cache"), accelerator="cpu", defaults=QUICK)
    cancel = threading.Event()
    steps = []

    def cancel_at_step_two(progress) -> None:
        steps.append(progress.step)
        if progress.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        editor.invert(DEMO_IMAGE, DEMO_PROMPT, on_progress=cancel_at_step_two, cancel=cancel)
    assert max(steps) == 2 and not list((tmp_path / "cache").iterdir())

    # A write that fails half-way (the disk fills while the inversion file is written).
    def full_disk(self, path, null_dtype="float32"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nti.Inversion, "save", full_disk)
    with pytest.raises(OSError):
        editor.invert(DEMO_IMAGE, DEMO_PROMPT)
    monkeypatch.undo()
    names = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert not any(name.endswith(".safetensors") or name.endswith(".tmp") for name in names), names
    assert editor.cache.get(editor.key(editor.prepare_image(DEMO_IMAGE), DEMO_PROMPT, QUICK)) is None

    # Then it works, and the lock was released by both failures.
    result = editor.invert(DEMO_IMAGE, DEMO_PROMPT)
    assert not result.cached and result.entry.inversion.num_inference_steps == 4
    assert editor.invert(DEMO_IMAGE, DEMO_PROMPT).cached
    edited = editor.edit(result.entry.key, EditRequest.from_fields(BLUE_PROMPT, blend_words="circle"))
    assert edited.kind == "replace" and len(edited.edits) == 1 and edited.edits[0].size == (32, 32)
    assert edited.grid.width > 3 * 32 and edited.attention.width > 0


def test_the_editors_messages_name_the_file_as_the_user_named_it(pipe, tmp_path):
    editor = Editor(pipe, InversionCache(tmp_path / "cache"), accelerator="cpu", defaults=QUICK)
    copy = tmp_path / "upload-3f2a" / "tiny.png"  # as a server keeps an upload: a folder of its own
    copy.parent.mkdir()
    Image.new("RGB", (1, 1), "red").save(copy)
    with pytest.raises(NtiError, match=r"^my photo \(1\)\.png: degenerate image \(1x1 px") as raised:
        editor.invert(copy, DEMO_PROMPT, name="my photo (1).png")
    assert str(copy.parent) not in str(raised.value)
    copy.write_text("not a picture")
    with pytest.raises(ValueError) as raised:
        editor.prepare_image(str(copy), "notes.png")
    assert str(raised.value).startswith("notes.png: not a readable image (")
    assert str(copy.parent) not in str(raised.value)
    with pytest.raises(ValueError, match=r"^tiny\.png: not a readable image"):  # without a name: the file's own
        editor.prepare_image(copy)


@pytest.mark.parametrize("method", ["ddpm", "proxnpi", "edict"])
def test_the_other_inversions_invert_and_edit_in_the_app(pipe, tmp_path, method):
    """Every method is a choice: edit-friendly DDPM and ProxNPI edit under Prompt-to-Prompt,
    EDICT with the prompts alone (its authors' editing), each with its reconstruction and maps."""
    editor = Editor(pipe, InversionCache(tmp_path / "cache"), accelerator="cpu", defaults=QUICK)
    settings = InversionSettings(num_inference_steps=5, num_inner_steps=2, method=method)
    result = editor.invert(DEMO_IMAGE, DEMO_PROMPT, settings=settings)
    assert result.entry.inversion.metadata["method"] == method
    edited = editor.edit(result.entry.key, EditRequest.from_fields(BLUE_PROMPT, blend_words="circle"))
    expected = "prompt swap (EDICT edits without attention control)" if method == "edict" else "replace"
    assert edited.kind == expected and len(edited.edits) == 1 and edited.attention.width > 0


@pytest.fixture(scope="module")
def ddim_editor(pipe, tmp_path_factory):
    """An `Editor` with a DDIM inversion of the demo image at T = 4 (no inner steps: quick), and its key."""
    editor = Editor(pipe, InversionCache(tmp_path_factory.mktemp("cache")), accelerator="cpu", defaults=QUICK)
    result = editor.invert(DEMO_IMAGE, DEMO_PROMPT, settings=InversionSettings(num_inference_steps=4, method="ddim"))
    return editor, result.entry.key


@pytest.mark.parametrize(
    "name, fields, kind, maps",
    [
        ("masactrl", {"start_step": 0.0, "start_layer": 4.0}, "MasaCtrl", True),  # a slider's whole floats
        ("pnp", {"feature_steps": 0.8, "attention_steps": 0.5}, "Plug-and-Play", False),
        ("p2p_zero", {"guidance_amount": 0.1, "caption": " a red circle  "}, "Pix2Pix-Zero", True),
    ],
)
def test_the_other_editors_edit_in_the_app(ddim_editor, name, fields, kind, maps):
    """The Editor choice: each editor edits the inversion with its own settings, read from the
    page's fields; its cross-attention maps are shown when it records them (Plug-and-Play does not)."""
    editor, key = ddim_editor
    options = editor_fields(name, **fields)
    assert "caption" not in options or options["caption"] == "a red circle"
    request = EditRequest.from_fields(BLUE_PROMPT, editor=name, editor_options=options)
    spec = request.spec(DEMO_PROMPT, editor.pipeline.tokenizer)
    assert spec["editor"] == name and "kind" not in spec and spec["options"] == options
    edited = editor.edit(key, request)
    assert edited.kind == kind and edited.prompts == [DEMO_PROMPT, BLUE_PROMPT]
    assert len(edited.edits) == 1 and edited.edits[0].size == (32, 32) and edited.grid.width > 3 * 32
    assert (edited.attention is not None) == maps
    assert edited.attention_prompt == ("a red circle" if name == "p2p_zero" else DEMO_PROMPT)
    assert kind_note(DEMO_PROMPT, BLUE_PROMPT, "auto", name).startswith(f"**{kind}**")


def test_an_editors_bad_setting_or_an_edit_it_cannot_make_is_a_message(pipe, ddim_editor, tmp_path):
    editor, key = ddim_editor
    for name, options, message in (
        ("masactrl", editor_fields("masactrl", 60, 10), r"^MasaCtrl settings: start_step must be .* 0 to 50, got 60"),
        ("masactrl", editor_fields("masactrl", 2.5, 10), r"^MasaCtrl settings: start_step must be a whole number"),
        ("pnp", {"feature_steps": 1.5}, r"^Plug-and-Play settings: feature_steps must be a share of the steps"),
        ("p2p_zero", {"guidance_amount": -1}, r"^Pix2Pix-Zero settings: guidance_amount must be a number >= 0"),
        ("p2p_zero", {"strength": 1}, r"^Pix2Pix-Zero settings: unknown option\(s\) \['strength'\]"),
        ("magic", {}, r"^editor must be one of p2p, masactrl, pnp, p2p_zero, got 'magic'"),
    ):
        with pytest.raises(AppInputError, match=message):
            EditRequest.from_fields(BLUE_PROMPT, editor=name, editor_options=options)
    # Built without `from_fields`: refused when the edit is asked for, before any model runs.
    with pytest.raises(AppInputError, match="MasaCtrl settings: start_layer"):
        editor.edit(key, EditRequest([BLUE_PROMPT], editor="masactrl", editor_options={"start_layer": 17}))
    # Edits an editor cannot make: an unchanged prompt for Pix2Pix-Zero, an EDICT inversion.
    with pytest.raises(AppInputError, match=r"Pix2Pix-Zero edits along the difference .* changes no word"):
        editor.edit(key, EditRequest.from_fields(DEMO_PROMPT, editor="p2p_zero"))
    settings = InversionSettings(num_inference_steps=3, num_inner_steps=1, method="edict")
    edict = editor.invert(DEMO_IMAGE, DEMO_PROMPT, settings=settings).entry.key
    with pytest.raises(AppInputError, match=r"^the Plug-and-Play editor cannot edit EDICT inversions: .*Prompt-to-"):
        editor.edit(edict, EditRequest.from_fields(BLUE_PROMPT, editor="pnp"))
    # ...and the Editor goes on serving (its lock released), any editor.
    assert editor.edit(key, EditRequest.from_fields(BLUE_PROMPT, editor="masactrl")).kind == "MasaCtrl"
    assert editor.edit(key, EditRequest.from_fields(BLUE_PROMPT, blend_words="circle")).kind == "replace"
