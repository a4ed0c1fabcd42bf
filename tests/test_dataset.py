"""Dataset runs: manifests and folders, sharding over ranks, resume, failures, methods, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_image, run_in_process, running_quietly, write_dataset
from test_progress import assert_log_progress

from nti_lightning import Inversion
from nti_lightning.cli import main
from nti_lightning.data.dataset import DatasetError, read_folder, read_manifest
from nti_lightning.data.plan import make_plan
from nti_lightning.data.walk import ImageSample
from nti_lightning.inversion import dataset_report

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"


def fit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nti_lightning.cli", "fit", "--config", str(CONFIG), "--trainer.logger", "false",
            *args]


# ------------------------------------------------------------------------------ reading
def test_manifest_rows_jsonl_csv_and_folder(tmp_path):
    random_image(1).save(tmp_path / "a.png")
    random_image(2).save(tmp_path / "b.png")
    (tmp_path / "m.jsonl").write_text(
        '{"image": "a.png", "prompt": "a cat", "id": "cat", "edits": [{"prompts": ["a dog"]}]}\n'
        "\n"
        "not json\n"
        '{"image": "b.png"}\n'
        '{"prompt": "no image"}\n'
    )
    samples, failures = read_manifest(tmp_path / "m.jsonl")
    assert [(s.id, s.prompt, Path(s.image).name, s.edits) for s in samples] == [
        ("cat", "a cat", "a.png", [{"prompts": ["a dog"]}])
    ]
    reasons = [f.reason for f in failures]
    assert len(reasons) == 3
    assert "m.jsonl:3: not JSON" in reasons[0]
    assert "m.jsonl:4: no 'prompt'" in reasons[1]
    assert "m.jsonl:5: no 'image'" in reasons[2]

    (tmp_path / "m.csv").write_text('image,prompt\na.png,"a cat, sitting"\nb.png,\n')
    samples, failures = read_manifest(tmp_path / "m.csv")
    assert [(s.id, s.prompt) for s in samples] == [("a", "a cat, sitting")]
    assert "m.csv:3" in failures[0].reason

    (tmp_path / "bad.csv").write_text("path,caption\nx,y\n")
    with pytest.raises(DatasetError, match="bad.csv: the CSV header must name 'image' and 'prompt'"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "a.txt").write_text("a cat on a mat\n")
    with pytest.raises(DatasetError, match="a.txt: a manifest must be .jsonl, .csv or a PIE-Bench mapping_file.json"):
        read_manifest(tmp_path / "a.txt")

    (tmp_path / "a.txt").write_text("a cat on a mat\n")
    samples, failures = read_folder(tmp_path)
    assert [(s.id, s.prompt) for s in samples] == [("a", "a cat on a mat")]
    assert failures[0].id == "b" and "b.txt: no prompt sidecar" in failures[0].reason


# ------------------------------------------------------------------------------ planning
def samples(count: int) -> list[ImageSample]:
    return [ImageSample(id=f"s{i}", prompt="p", image=f"s{i}.png") for i in range(count)]


def test_plan_deals_the_same_batches_to_any_number_of_ranks():
    plan = make_plan(samples(5), [], batch_size=2, world_size=2, check_images=False)
    ids = lambda batches: [[s.id for s in batch] for batch in batches]  # noqa: E731
    assert plan.slots == 2
    assert ids(plan.rank_batches(0)) == [["s0", "s1"], ["s4"]]
    assert ids(plan.rank_batches(1)) == [["s2", "s3"], []]  # padded with an empty batch, never an image twice
    single = make_plan(samples(5), [], batch_size=2, world_size=1, check_images=False)
    assert ids(single.rank_batches(0)) == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert [plan.images_done(k) for k in range(3)] == [0, 4, 5]
    # One image with a large B: the embedding is not padded to B.
    assert make_plan(samples(1), [], batch_size=8, check_images=False).slots == 1
    assert make_plan([], [], batch_size=4, world_size=3, check_images=False).rank_batches(2) == []


def test_plan_skips_valid_artifacts_redoes_corrupt_ones_and_refuses_other_settings(tmp_path):
    settings = {"model": "tiny", "method": "null_text", "num_inference_steps": 2, "guidance_scale": 7.5}
    done = Inversion(torch.zeros(4, 2, 2), torch.zeros(2, 77, 8), torch.zeros(4, 2, 2), "p", {**settings, "id": "s0"})
    done.save(tmp_path / "s0.safetensors")
    data = (tmp_path / "s0.safetensors").read_bytes()
    (tmp_path / "s1.safetensors").write_bytes(data[: len(data) // 2])  # killed mid-copy by something else
    (tmp_path / ".s2.safetensors.abc.tmp").write_bytes(b"partial")  # our own write, killed
    plan = make_plan(samples(3), [], 2, output_dir=tmp_path, settings=settings, check_images=False)
    assert [s.id for s, _ in plan.skipped] == ["s0"]
    assert plan.redone == ["s1"]
    assert [s.id for batch in plan.batches for s in batch] == ["s1", "s2"]
    assert not (tmp_path / ".s2.safetensors.abc.tmp").exists()
    overwritten = make_plan(samples(3), [], 2, output_dir=tmp_path, settings=settings, overwrite=True,
                            check_images=False)
    assert overwritten.num_images == 3
    with pytest.raises(DatasetError, match=r"s0.safetensors \(guidance_scale: 7.5 there, 3.0 now\).*overwrite"):
        make_plan(samples(3), [], 2, output_dir=tmp_path, settings={**settings, "guidance_scale": 3.0},
                  check_images=False)


# ------------------------------------------------------------------------------ whole runs
def test_corrupt_and_missing_images_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest = write_dataset(tmp_path / "data", 3)
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    random_image(9, (4, 3)).save(tmp_path / "data" / "speck.png")
    with manifest.open("a") as handle:
        for name in ("broken.png", "ghost.png", "speck.png"):
            handle.write(json.dumps({"image": name, "prompt": "x"}) + "\n")
    arguments = ["fit", "--config", str(CONFIG), "--data.manifest", str(manifest), "--model.output_dir", "out",
                 "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_info:  # some images failed: status 1
        main(arguments)
    assert exit_info.value.code == 1
    out = tmp_path / "out"
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {f["id"]: f["reason"] for f in failures}
    assert sorted(reasons) == ["broken", "ghost", "speck"]
    assert "broken.png: not a readable image" in reasons["broken"]
    assert reasons["ghost"].endswith("ghost.png: image file not found")
    assert reasons["speck"].endswith("speck.png: degenerate image (4x3 px; at least 8 px a side)")
    report = json.loads((out / "report.json").read_text())
    assert sorted(row["id"] for row in report["images"]) == ["img0", "img1", "img2"]
    assert all(row["status"] == "done" and row["psnr"] is not None for row in report["images"])
    assert "3 inverted, 0 skipped (already done), 3 failed" in capsys.readouterr().out

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    with pytest.raises(SystemExit):  # the rerun skips everything that is done, and still reports the failures
        main(arguments)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps
    report = json.loads((out / "report.json").read_text())
    assert sorted(row["status"] for row in report["images"]) == ["skipped"] * 3
    assert len(report["failures"]) == 3
    assert "0 inverted, 3 skipped (already done), 3 failed" in capsys.readouterr().out


def test_three_methods_one_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest = write_dataset(tmp_path / "data", 2)
    for method in ("null_text", "negative_prompt", "ddim"):
        main(["fit", "--config", str(CONFIG), "--data.manifest", str(manifest), "--trainer.logger", "false",
              "--model.method", method, "--model.output_dir", method, "--model.num_inference_steps", "10",
              "--model.num_inner_steps", "10", "--model.guidance_scale", "7.5"])
        inversion = Inversion.load(tmp_path / method / "img0.safetensors")
        assert inversion.metadata["method"] == method and inversion.null_embeddings.shape == (10, 77, 32)
    capsys.readouterr()
    summary = dataset_report.main(["null_text", "negative_prompt", "ddim", "--output", "all.csv"])
    table = capsys.readouterr().out
    assert all(f"| {method} | 2 |" in table for method in ("null_text", "negative_prompt", "ddim"))
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 1 + 3 * 2
    assert summary["null_text"]["inner_iterations"] > 0
    assert summary["negative_prompt"]["inner_iterations"] == summary["ddim"]["inner_iterations"] == 0
    # The DDIM-only method's reconstruction is the DDIM baseline every method reports.
    ddim_rows = dataset_report.read_rows("ddim")
    assert all(abs(row["psnr"] - row["ddim_psnr"]) < 1e-4 for row in ddim_rows)
    # Null-text lands closer to the source latent than sampling the pivot back at w = 7.5 (the
    # tiny model's random decoder makes pixel PSNR meaningless; the latent error is not).
    assert summary["null_text"]["latent_error"] < summary["ddim"]["latent_error"]
    # The negative prompt's embedding is the prompt's own: every stored step equals C.
    negative = Inversion.load(tmp_path / "negative_prompt" / "img1.safetensors").null_embeddings
    assert torch.equal(negative[0], negative[-1]) and not torch.equal(
        negative[0], Inversion.load(tmp_path / "ddim" / "img1.safetensors").null_embeddings[0]
    )


# Lockstep here; continuous scheduling's two-process run, with early stops and `sync_every`, is
# tests/test_slots.py's.
@pytest.mark.parametrize("scheduling", ["lockstep"])
def test_two_process_ddp_equals_one_process(tmp_path, one_process_fit, scheduling):
    common = ["--data.manifest", str(one_process_fit.manifest), "--data.batch_size", "2",
              "--trainer.accelerator", "cpu", "--model.scheduling", scheduling]
    started = time.monotonic()
    with running_quietly(
        fit_command(*common, "--model.output_dir", "two", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.enable_progress_bar", "true"),
        tmp_path,
    ) as two_processes:
        # meanwhile the one-process run: this command with "--trainer.devices 1", in this process on one thread
        one = one_process_fit(scheduling)
        result = two_processes()
    assert "5 inverted, 0 skipped (already done), 0 failed" in result.stdout
    assert_log_progress(result.stderr, 5, time.monotonic() - started)
    two = tmp_path / "two"
    assert sorted(p.name for p in two.glob("*.safetensors")) == [f"img{i}.safetensors" for i in range(5)]
    rows = json.loads((two / "report.json").read_text())["images"]
    assert sorted(row["id"] for row in rows) == [f"img{i}" for i in range(5)]  # each image once
    for i in range(5):
        a, b = Inversion.load(one / f"img{i}.safetensors"), Inversion.load(two / f"img{i}.safetensors")
        assert torch.allclose(a.z_T, b.z_T, atol=1e-5, rtol=0)
        assert torch.allclose(a.null_embeddings, b.null_embeddings, atol=1e-5, rtol=0)
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]


def test_sigkill_then_rerun_finishes_every_image_exactly_once(tmp_path):
    manifest = write_dataset(tmp_path / "data", 6)
    command = fit_command("--data.manifest", str(manifest), "--data.batch_size", "1", "--model.output_dir", "out",
                          "--model.num_inference_steps", "8", "--model.num_inner_steps", "5")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    out = tmp_path / "out"
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.safetensors"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert 2 <= len(before) < 6, "the run should be killed mid-dataset"
    for name in before:
        Inversion.load(out / name)  # whatever is there is complete

    result = run_in_process(command[3:], tmp_path)  # the rerun: `nti fit` with the same arguments
    assert f"{6 - len(before)} inverted, {len(before)} skipped (already done), 0 failed" in result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert sorted(after) == [f"img{i}.safetensors" for i in range(6)]
    assert all(after[name] == stamp for name, stamp in before.items())  # nothing done twice
    assert not list(out.glob(".*.tmp"))
    for name in after:
        Inversion.load(out / name)
    rows = json.loads((out / "report.json").read_text())["images"]
    assert sorted(row["id"] for row in rows) == [f"img{i}" for i in range(6)]
