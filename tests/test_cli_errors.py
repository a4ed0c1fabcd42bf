"""`nti` as a user runs it: one `nti: error:` line and a documented exit status for every mistake,
failures counted in the status, interrupts that keep the work done, and the demo commands free of
other libraries' notices.

Most commands run `main([...])` in this process (`nti_main`: its exit status, stdout and stderr as
the console script gives them); a subprocess only where the separate process is the point: the
console script printing no traceback, a signal, and the demo commands' notices at import.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COMMAND, nti

from nti_lightning import Inversion
from nti_lightning.cli import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    main,
)
from nti_lightning.data.images import ImageError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/configs/tiny.yaml")


def assert_user_error(result: subprocess.CompletedProcess, *culprits: str) -> None:
    """Exit status 2, no traceback, and exactly one `nti: error:` line naming every culprit."""
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("nti: error:")]
    assert len(lines) == 1, result.stderr
    for culprit in culprits:
        assert culprit in lines[0]


@pytest.fixture
def photo(tmp_path, images) -> Path:
    path = tmp_path / "photo.png"
    images[0].save(path)
    return path


def fit(*args: str) -> list[str]:
    return ["fit", "--config", TINY, "--trainer.logger", "false", *args]


@pytest.mark.parametrize(
    "args, culprits",
    [
        (["--data.image", "ghost.png", "--data.prompt", "x"], ["ghost.png", "not found"]),
        (["--model.num_inner_steps", "0"], ["model.num_inner_steps", "0"]),
        (["--model.num_inference_steps", "0"], ["model.num_inference_steps"]),
        (["--data.batch_size", "0"], ["data.batch_size"]),
        (["--trainer.precision", "bf16-true"], ["trainer.precision", "bf16-true"]),
        (["--model.output_dir", "blocker/out"], ["blocker/out", "output folder"]),
        (["--data.ids", "[../escaped]"], ["ids", "'../escaped'", "path separator"]),
        (["--model.pretrained", "./no-such-model"], ["./no-such-model"]),
        (["--model.pretrained", "no-such-user/no-such-model"], ["no-such-user/no-such-model", "cannot load"]),
    ],
    ids=[
        "missing-image", "zero-inner-steps", "zero-steps", "batch-size-0", "precision", "output-dir", "bad-id", "model",
        "hub-id",
    ],
)
def test_a_mistake_is_one_line_and_status_2(tmp_path, photo, nti_main, args, culprits):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    if "--data.image" not in args:
        args = ["--data.image", str(photo), "--data.prompt", "a photo", *args]
    result = nti_main(*fit("--model.output_dir", "out", *args), cwd=tmp_path)
    assert_user_error(result, *culprits)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_unknown_command_and_debug_traceback(tmp_path, monkeypatch):
    # The console script itself, in its own process: one line, status 2, no traceback.
    assert_user_error(nti("invrt", cwd=tmp_path), "'invrt'")
    # NTI_DEBUG=1: `main` lets the error out, so the interpreter prints its traceback (status 1).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTI_DEBUG", "1")
    with pytest.raises(ImageError, match="ghost.png"):
        main(fit("--data.image", "ghost.png", "--data.prompt", "x"))


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_duplicate_ids_are_a_dataset_error(tmp_path, photo, nti_main):
    manifest = write_manifest(tmp_path / "data.jsonl", [{"image": photo.name, "prompt": "a", "id": "x"}] * 2)
    assert_user_error(nti_main(*fit("--data.manifest", str(manifest)), cwd=tmp_path), "data.jsonl", "unique", "x")


def test_unsafe_ids_and_failures_give_status_1_and_nothing_outside_the_output_dir(tmp_path, photo, nti_main):
    (tmp_path / "work").mkdir()
    manifest = write_manifest(
        tmp_path / "work" / "data.jsonl",
        [
            {"image": f"../{photo.name}", "prompt": "a photo", "id": "../escaped"},
            {"image": f"../{photo.name}", "prompt": "a photo", "id": ".hidden"},
            {"image": f"../{photo.name}", "prompt": "a photo", "id": "good"},
            {"image": "missing.png", "prompt": "a photo"},
        ],
    )
    result = nti_main(*fit("--data.manifest", str(manifest), "--model.output_dir", "out"), cwd=tmp_path / "work")
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    assert "1 inverted, 0 skipped (already done), 3 failed" in result.stdout
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == ["good.safetensors"]
    assert (tmp_path / "work" / "out" / "good.safetensors").exists()
    failures = (tmp_path / "work" / "out" / "failures.jsonl").read_text().splitlines()
    reasons = [json.loads(line)["reason"] for line in failures]
    assert any("data.jsonl:1" in reason and "'../escaped' holds a path separator" in reason for reason in reasons)
    assert any("data.jsonl:2" in reason and "starts with a dot" in reason for reason in reasons)
    assert any("missing.png" in reason for reason in reasons)


def test_a_run_in_which_every_image_failed_exits_1(tmp_path, nti_main):
    manifest = write_manifest(tmp_path / "data.jsonl", [{"image": "gone.png", "prompt": "a"}])
    result = nti_main(*fit("--data.manifest", str(manifest), "--model.output_dir", "out"), cwd=tmp_path)
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "0 inverted, 0 skipped (already done), 1 failed" in result.stdout and "gone.png" in result.stdout


def test_failed_edits_exit_1(tmp_path, nti_main):
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"artifact": "nowhere.safetensors", "prompts": ["a dog"]}) + "\n"
                     + json.dumps({"artifact": "nowhere.safetensors", "prompts": ["a dog"], "id": "../up"}) + "\n")
    result = nti_main("predict", "--config", str(ROOT / "tests/configs/edit_tiny.yaml"),
                      "--data.edits_file", str(edits), "--writer.output_dir", "edits", "--trainer.logger", "false",
                      cwd=tmp_path)
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "edits" / "failures.jsonl").read_text().splitlines()]
    assert "nowhere.safetensors" in records[0]["error"] and "'../up' holds a path separator" in records[1]["error"]
    assert not (tmp_path / "up_grid.png").exists() and not list(tmp_path.glob("up*"))


@pytest.mark.parametrize(
    "signum, status", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)], ids=["SIGINT", "SIGTERM"]
)
def test_an_interrupted_run_keeps_its_work_and_the_rerun_finishes_it(tmp_path, images, nti_main, signum, status):
    rows = []
    for i in range(4):
        images[i % len(images)].save(tmp_path / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "prompt": "a photo"})
    manifest = write_manifest(tmp_path / "data.jsonl", rows)
    # About 1.5 s an image on a CPU (T = 10, N = 5): the signal, sent within 50 ms of the first
    # artifact, lands with most of the four still to do.
    args = fit("--data.manifest", str(manifest), "--model.output_dir", "out", "--data.batch_size", "1",
               "--model.num_inference_steps", "10", "--model.num_inner_steps", "5", "--model.early_stop_epsilon", "0")
    # A job started in the background by a shell inherits SIGINT ignored (and Python then installs
    # no Ctrl-C handler): give the run the default disposition a terminal's Ctrl-C meets.
    process = subprocess.Popen([*COMMAND, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list((tmp_path / "out").glob("*.safetensors")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    done = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert 1 <= len(done) < 4
    assert f"interrupted: {len(done)} inverted; rerun the same command to finish" in stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(f"{row['id']}.safetensors" for row in report["images"]) == done
    assert not list((tmp_path / "out").glob(".*.tmp"))
    rerun = nti_main(*args, cwd=tmp_path)  # the signal needed the separate process; the rerun does not
    assert rerun.returncode == 0, rerun.stderr
    assert f"{4 - len(done)} inverted, {len(done)} skipped (already done), 0 failed" in rerun.stdout


def test_the_demo_commands_print_no_warnings(demo_commands):
    folder = demo_commands.folder  # where a user ran them: a clean folder holding configs/images
    for result in (demo_commands.fitted, demo_commands.edited):
        assert result.returncode == 0, result.stderr
        words = ("warn", "deprecat", "tip:", "not found", "torchvision", "hp_metric")
        noisy = [line for line in result.stderr.splitlines() if any(word in line.lower() for word in words)]
        assert noisy == []
        assert "FLOPs" not in result.stdout and "Trainable params" not in result.stdout
    assert (folder / "inversions/demo/demo_red_circle.safetensors").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((folder / "runs").rglob("events.out.tfevents.*"))
    tags = set()
    for event in events:
        tags |= set(EventAccumulator(str(event)).Reload().Tags()["scalars"])
    assert "hp_metric" not in tags and "timestep/loss" in tags


def test_a_second_run_on_a_folder_in_use_stops_at_once_and_a_stale_lock_is_taken_over(tmp_path, photo, nti_main):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".nti.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # this test: alive
    args = fit("--data.image", str(photo), "--data.prompt", "a photo", "--model.output_dir", "out")
    assert_user_error(nti_main(*args, cwd=tmp_path), "out", "in use by another nti run", str(os.getpid()))
    assert lock.exists() and not list(out.glob("*.safetensors"))

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))  # killed long ago
    result = nti_main(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "photo.safetensors").exists() and not lock.exists()


def test_a_write_failure_is_named_and_keeps_what_was_written(tmp_path, monkeypatch, capsys, images):
    from nti_lightning.cli import main
    from nti_lightning.storage import atomic

    monkeypatch.chdir(tmp_path)
    for i in range(2):
        images[i].save(tmp_path / f"p{i}.png")
    real_replace, calls = os.replace, []

    def disk_full_on_second_artifact(source, target):
        calls.append(str(target))
        if str(target).endswith("p1.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", disk_full_on_second_artifact)
    with pytest.raises(SystemExit) as exit_info:
        main(fit("--data.images", "[p0.png,p1.png]", "--data.prompt", "a photo", "--data.batch_size", "1",
                 "--model.output_dir", "out", "--trainer.enable_progress_bar", "false"))
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"nti: error: {Path('out') / 'p1.safetensors'}: cannot write (No space left on device)" in err
    assert "Traceback" not in err
    assert Inversion.load(tmp_path / "out" / "p0.safetensors").prompt == "a photo"
    # no temporary file, no lock; the run's config beside the artifact
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "p0.png", "p0.safetensors"]


def test_an_inversion_is_refused_by_a_model_with_other_weights(tmp_path, images, caplog, monkeypatch, nti_main):
    import nti_lightning as package
    compatible_module = importlib.import_module("nti_lightning.inversion.compatible")
    from nti_lightning.errors import ModelError
    from nti_lightning.models.tiny import tiny_pipeline

    pipeline, other = package.load_pipeline("tiny"), tiny_pipeline(seed=1)  # same shapes, other weights
    (inversion,) = package.invert(pipeline, images[0], "a photo", num_inference_steps=3, num_inner_steps=2,
                              output_dir=str(tmp_path / "out"))
    assert inversion.metadata["model_fingerprint"] == package.models.fingerprint.pipeline_fingerprint(pipeline)
    half = pipeline.to(dtype=torch.float16)
    assert package.models.fingerprint.pipeline_fingerprint(half) == inversion.metadata["model_fingerprint"]
    pipeline.to(dtype=torch.float32)
    with pytest.raises(
        ModelError, match=r"made with 'tiny' \(weights fingerprint [0-9a-f]{16}\), but this model .* has other weights"
    ):
        package.reconstruct(other, inversion)
    own = package.reconstruct(pipeline, inversion)  # its own model: accepted
    assert package.reconstruct(other, inversion, allow_model_mismatch=True).size == own.size

    old = Inversion.load(tmp_path / "out" / "image_0.safetensors")
    del old.metadata["model_fingerprint"]  # as written before fingerprints existed: a warning, then accepted
    # said once per process: an earlier test may have
    monkeypatch.setattr(compatible_module, "_warned_unfingerprinted", False)
    with caplog.at_level("WARNING"):
        package.reconstruct(other, old)
    assert "records no model fingerprint" in caplog.text

    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        json.dumps({"artifact": str(tmp_path / "out" / "image_0.safetensors"), "prompts": ["a dog"]}) + "\n"
    )
    (tmp_path / "model").mkdir()
    other.save_pretrained(tmp_path / "model")
    args = ["predict", "--config", str(ROOT / "tests/configs/edit_tiny.yaml"), "--data.edits_file", str(edits),
            "--writer.output_dir", "edits", "--trainer.logger", "false", "--model.pretrained", str(tmp_path / "model")]
    refused = nti_main(*args, cwd=tmp_path)
    assert refused.returncode == EXIT_SOME_FAILED
    assert "has other weights" in (tmp_path / "edits" / "failures.jsonl").read_text()
    allowed = nti_main(*args, "--model.allow_model_mismatch", "true", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_resume_refuses_artifacts_made_with_other_weights(tmp_path, images):
    import nti_lightning as package
    from nti_lightning.data.dataset import DatasetError
    from nti_lightning.data.plan import make_plan
    from nti_lightning.data.walk import ImageSample

    package.invert(package.load_pipeline("tiny"), images[0], "a photo", num_inference_steps=2, num_inner_steps=1,
                   output_dir=str(tmp_path), ids=["cat"])
    metadata = Inversion.read_metadata(tmp_path / "cat.safetensors")
    settings = {key: metadata[key] for key in ("model", "model_fingerprint", "method", "num_inference_steps",
                                               "guidance_scale", "num_inner_steps", "early_stop_epsilon",
                                               "learning_rate")}
    samples = [ImageSample(id="cat", prompt="a photo", image=tmp_path / "cat.png")]
    assert len(make_plan(samples, [], 1, output_dir=tmp_path, settings=settings, check_images=False).skipped) == 1
    other = {**settings, "model_fingerprint": "0123456789abcdef"}
    with pytest.raises(
        DatasetError, match=r"cat.safetensors \(model_fingerprint: '[0-9a-f]{16}' there, '0123456789abcdef' now\)"
    ):
        make_plan(samples, [], 1, output_dir=tmp_path, settings=other, check_images=False)
    del settings["model_fingerprint"]  # allow_model_mismatch leaves the fingerprint out of the settings
    assert len(make_plan(samples, [], 1, output_dir=tmp_path, settings=settings, check_images=False).skipped) == 1


def test_nti_destroys_the_process_group_a_run_leaves(tmp_path, capsys):
    # Lightning leaves a gloo group to interpreter shutdown, which can abort the process after
    # the work is done; `nti` destroys it itself, on success and on a user's error alike.
    import torch.distributed as dist

    statuses, initialized = [], []
    try:
        for args in (["--help"], ["nonsense"]):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store-{args[0]}", rank=0, world_size=1)
            try:
                main(args)
                statuses.append(0)
            except SystemExit as exit_:
                statuses.append(exit_.code)
            initialized.append(dist.is_initialized())
    finally:  # never leave a group to the tests after this one
        if dist.is_initialized():
            dist.destroy_process_group()
    assert initialized == [False, False] and statuses[1] == 2

