"""`nti` as a user runs it, in a subprocess: one `nti: error:` line and a documented exit status
for every mistake, failures counted in the status, interrupts that keep the work done, and the
demo commands free of other libraries' notices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nti_lightning.cli import EXIT_SIGINT, EXIT_SIGTERM, EXIT_SOME_FAILED, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/configs/tiny.yaml")
NTI = Path(sys.executable).with_name("nti")
COMMAND = [str(NTI)] if NTI.exists() else [sys.executable, "-c", "from nti_lightning.cli import main; main()"]


def nti(*args: str, cwd: Path, debug: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "NTI_DEBUG"}
    if debug:
        env["NTI_DEBUG"] = "1"
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


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
    ],
    ids=["missing-image", "zero-inner-steps", "zero-steps", "batch-size-0", "precision", "output-dir", "bad-id", "model"],
)
def test_a_mistake_is_one_line_and_status_2(tmp_path, photo, args, culprits):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    if "--data.image" not in args:
        args = ["--data.image", str(photo), "--data.prompt", "a photo", *args]
    result = nti(*fit("--model.output_dir", "out", *args), cwd=tmp_path)
    assert_user_error(result, *culprits)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_unknown_command_and_debug_traceback(tmp_path):
    assert_user_error(nti("invrt", cwd=tmp_path), "'invrt'")
    debug = nti(*fit("--data.image", "ghost.png", "--data.prompt", "x"), cwd=tmp_path, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ImageError" in debug.stderr


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_duplicate_ids_are_a_dataset_error(tmp_path, photo):
    manifest = write_manifest(tmp_path / "data.jsonl", [{"image": photo.name, "prompt": "a", "id": "x"}] * 2)
    assert_user_error(nti(*fit("--data.manifest", str(manifest)), cwd=tmp_path), "data.jsonl", "unique", "x")


def test_unsafe_ids_and_failures_give_status_1_and_nothing_outside_the_output_dir(tmp_path, photo):
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
    result = nti(*fit("--data.manifest", str(manifest), "--model.output_dir", "out"), cwd=tmp_path / "work")
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    assert "1 inverted, 0 skipped (already done), 3 failed" in result.stdout
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == ["good.safetensors"]
    assert (tmp_path / "work" / "out" / "good.safetensors").exists()
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "work" / "out" / "failures.jsonl").read_text().splitlines()]
    assert any("data.jsonl:1" in reason and "'../escaped' holds a path separator" in reason for reason in reasons)
    assert any("data.jsonl:2" in reason and "starts with a dot" in reason for reason in reasons)
    assert any("missing.png" in reason for reason in reasons)


def test_a_run_in_which_every_image_failed_exits_1(tmp_path):
    manifest = write_manifest(tmp_path / "data.jsonl", [{"image": "gone.png", "prompt": "a"}])
    result = nti(*fit("--data.manifest", str(manifest), "--model.output_dir", "out"), cwd=tmp_path)
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "0 inverted, 0 skipped (already done), 1 failed" in result.stdout and "gone.png" in result.stdout


def test_failed_edits_exit_1(tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"artifact": "nowhere.safetensors", "prompts": ["a dog"]}) + "\n"
                     + json.dumps({"artifact": "nowhere.safetensors", "prompts": ["a dog"], "id": "../up"}) + "\n")
    result = nti("predict", "--config", str(ROOT / "tests/configs/edit_tiny.yaml"), "--data.edits_file", str(edits),
                 "--writer.output_dir", "edits", "--trainer.logger", "false", cwd=tmp_path)
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "edits" / "failures.jsonl").read_text().splitlines()]
    assert "nowhere.safetensors" in records[0]["error"] and "'../up' holds a path separator" in records[1]["error"]
    assert not (tmp_path / "up_grid.png").exists() and not list(tmp_path.glob("up*"))


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_keeps_its_work_and_the_rerun_finishes_it(tmp_path, images, signum, status):
    rows = []
    for i in range(8):
        images[i % len(images)].save(tmp_path / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "prompt": "a photo"})
    manifest = write_manifest(tmp_path / "data.jsonl", rows)
    args = fit("--data.manifest", str(manifest), "--model.output_dir", "out", "--data.batch_size", "1",
               "--model.num_inference_steps", "40", "--model.num_inner_steps", "5", "--model.early_stop_epsilon", "0")
    process = subprocess.Popen([*COMMAND, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "out").glob("*.safetensors")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    done = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert 1 <= len(done) < 8
    assert f"interrupted: {len(done)} inverted; rerun the same command to finish" in stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(f"{row['id']}.safetensors" for row in report["images"]) == done
    assert not list((tmp_path / "out").glob(".*.tmp"))
    rerun = nti(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - len(done)} inverted, {len(done)} skipped (already done), 0 failed" in rerun.stdout


def test_the_demo_commands_print_no_warnings(tmp_path):
    image = str(ROOT / "configs/images/demo_red_circle.png")
    fitted = nti("fit", "--config", str(ROOT / "configs/demo.yaml"), "--data.image", image, cwd=tmp_path)
    edited = nti("predict", "--config", str(ROOT / "configs/edit_demo.yaml"), cwd=tmp_path)
    for result in (fitted, edited):
        assert result.returncode == 0, result.stderr
        noisy = [line for line in result.stderr.splitlines()
                 if any(word in line.lower() for word in ("warn", "deprecat", "tip:", "not found", "torchvision", "hp_metric"))]
        assert noisy == []
        assert "FLOPs" not in result.stdout and "Trainable params" not in result.stdout
    assert (tmp_path / "inversions/demo/demo_red_circle.safetensors").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((tmp_path / "runs").rglob("events.out.tfevents.*"))
    tags = set()
    for event in events:
        tags |= set(EventAccumulator(str(event)).Reload().Tags()["scalars"])
    assert "hp_metric" not in tags and "timestep/loss" in tags
