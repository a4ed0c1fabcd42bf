"""The inversion benchmark script runs end to end on the tiny model and reports every row."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from nti_lightning import host_memory

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_inversion.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmark_inversion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses resolve their annotations through sys.modules.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    return float(cell.split()[0].rstrip("x"))


def test_tiny_run_prints_every_row_and_appends_a_json_line(script, tmp_path, capsys, monkeypatch):
    # An option `invert` does not take is skipped with a note, not passed through.
    monkeypatch.setitem(script.CONFIGURATIONS, "unknown-option", {"no_such_option": True})
    output = tmp_path / "results.jsonl"
    # One thread: this checks the mechanics, and a single thread is not stalled by other work on the cores.
    # Two rounds (--repeats 2): every row is timed twice and the fastest kept, its counts those of one round.
    argv = ["--model", "tiny", "--device", "cpu", "--batch-size", "2", "--steps", "3", "--inner-steps", "2",
            "--baseline-images", "1", "--threads", "1", "--configs", "fp32", "bf16", "unknown-option",
            "--repeats", "2", "--output", str(output)]
    record = script.main(argv)
    printed = capsys.readouterr().out

    assert "skipping unknown-option: invert() takes no no_such_option" in printed
    rows = table_rows(printed, "| configuration | mode |")
    expected = {(name, mode) for name in ("baseline", "fp32", "bf16") for mode in ("full", "early-stop")}
    assert {(row[0], row[1]) for row in rows} == expected and len(rows) == len(expected)
    for row in rows:
        images, seconds, per_image, rate, speedup, peak, per_image_memory, iterations, unet_rows = row[2:]
        assert images == ("1 of 2" if row[0] == "baseline" else "2")
        assert all(number(cell) > 0 for cell in (seconds, per_image, rate, speedup, peak, iterations)), row
        assert number(per_image_memory) >= 0
        assert number(iterations) == 3 * 2  # T·N: a random model's loss never reaches ε = 1e-5
        # the reference's UNet rows: T pivot, and per step 1 conditional, N inner and 2 advance rows;
        # the package adds the report's DDIM-baseline sampling (2 rows a step) only with ddim_baseline
        assert number(unet_rows) == 3 + 3 * (1 + 2 + 2), row
    fidelity = table_rows(printed, "| configuration vs fp32")
    assert [row[0] for row in fidelity] == ["bf16"]

    [line] = output.read_text().splitlines()
    saved = json.loads(line)
    assert saved["rows"] == json.loads(json.dumps(record["rows"]))
    assert saved["torch"] and saved["device"] and saved["date"] and "git_commit" in saved
    assert saved["skipped"] == {"unknown-option": "invert() takes no no_such_option"}
    assert len(saved["rows"]) == 6 and all(row["images_per_second"] > 0 for row in saved["rows"])
    for row in record["rows"]:  # two rounds, the fastest kept
        assert len(row["seconds_of_repeats"]) == 2 and row["seconds"] == min(row["seconds_of_repeats"])
    bf16 = saved["fidelity"]["bf16"]
    assert all(math.isfinite(value) for value in bf16.values())
    assert 0 < bf16["embedding_relative_error_max"] < 0.5 and bf16["displacement_cosine_min"] > 0.5


def test_sdxl_model_runs_against_the_sdxl_reference_loop(script, capsys):
    """An SDXL model is timed against tests/reference_xl.py, with the checkpointing configuration."""
    argv = ["--model", "tiny-xl", "--device", "cpu", "--batch-size", "1", "--steps", "2", "--inner-steps", "2",
            "--threads", "1", "--configs", "fp32", "bf16+checkpointing", "--modes", "full", "--warmup-steps", "1"]
    record = script.main(argv)
    printed = capsys.readouterr().out
    assert "tiny-xl on cpu (32x32)" in printed
    rows = {(row["configuration"], row["mode"]): row for row in record["rows"]}
    assert set(rows) == {("baseline", "full"), ("fp32", "full"), ("bf16+checkpointing", "full")}
    assert all(row["images_per_second"] > 0 and row["inner_iterations_per_image"] == 4 for row in rows.values())
    assert set(record["fidelity"]) == {"bf16+checkpointing"}


@pytest.mark.slow  # T = 50: the held-out images' early stops come in the last steps only
def test_converging_model_continuous_spends_no_row_on_stopped_images(script, capsys):
    """On the shapes model's held-out images early stopping happens; continuous batching costs the
    reference's UNet rows per image exactly, lockstep batches more. One round (--repeats, whose
    counts are those of one round, is checked on the tiny model)."""
    argv = ["--model", "shapes", "--images", "heldout", "--num-images", "2", "--batch-size", "2", "--device", "cpu",
            "--steps", "50", "--inner-steps", "10", "--threads", "1", "--configs", "fp32", "fp32+lockstep",
            "--modes", "early-stop", "--warmup-steps", "1", "--no-fidelity", "--baseline-images", "0"]
    record = script.main(argv)
    assert "2 images (heldout), B=2" in capsys.readouterr().out
    rows = {row["configuration"]: row for row in record["rows"]}
    assert set(rows) == {"fp32", "fp32+lockstep"}  # the baseline's counts are checked on the tiny model
    continuous, lockstep = rows["fp32"], rows["fp32+lockstep"]
    assert sum(continuous["inner_iterations"]) < 2 * 50 * 10  # the model converges: steps stop early
    # the reference's rows: per image T pivot rows, and per step 1 conditional, its inner
    # iterations and 2 advance rows; continuous batching spends exactly that, lockstep more.
    # Integer totals: the per-image means are floats whose rounding varies with the counts.
    def reference_rows(row):
        return row["images"] * (50 + 3 * 50) + sum(row["inner_iterations"])

    assert len(continuous["inner_iterations"]) == continuous["images"] == 2
    assert continuous["unet_rows"] == reference_rows(continuous), continuous
    assert lockstep["unet_rows"] > reference_rows(lockstep)


def test_unet_call_cost_prints_a_price_per_call_size(capsys):
    spec = importlib.util.spec_from_file_location("unet_call_cost", SCRIPT.parent / "unet_call_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--model", "tiny", "--device", "cpu", "--rows", "1", "3", "--warmup", "1", "--repeat", "2",
                           "--threads", "1"])
    assert [r["rows"] for r in results] == [1, 3]
    # Timings only as measured numbers: which call is faster is the script's finding, and two
    # timings on a busy machine can come out in either order.
    assert all(math.isfinite(r[key]) and r[key] > 0 for r in results for key in ("forward_ms", "forward_backward_ms"))
    rows = table_rows(capsys.readouterr().out, "| rows |")
    assert [row[0] for row in rows] == ["1", "3"]


def test_pie_throughput_runs_nti_bench_and_gives_images_per_hour_per_method(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pie_throughput"])
    spec = importlib.util.spec_from_file_location("pie_throughput", SCRIPT.parent / "pie_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "results.jsonl"
    methods = ["null_text", "ddim", "negative_prompt", "direct"]  # by default every method
    result = module.main(["--tiny", "--folder", str(tmp_path / "run"), "--output", str(output), "--methods", *methods])
    assert json.loads(output.read_text()) == result
    assert [row["method"] for row in result["rows"]] == methods
    for row in result["rows"]:
        assert row["invert_s"] > 0 and row["edit_s"] > 0
        assert math.isfinite(row["images_per_hour"]) and row["images_per_hour"] > 0
        # Both numbers are recorded to one decimal: the minutes are up to 0.05 off their exact
        # value (4.0 for 4.046 when the tiny run is fast), and the rate's own rounding (up to 0.05
        # an hour) moves the minutes by up to that share of them.
        rate, minutes = row["images_per_hour"], 700 / row["images_per_hour"] * 60
        assert abs(row["pie_bench_minutes"] - minutes) <= 0.05 + minutes * 0.05 / rate + 1e-9
    # the scores came from the random-weight scorers: structure distance and CLIP are numbers
    rows = table_rows(capsys.readouterr().out, "| method | images | distance")
    assert all(math.isfinite(float(row[2])) for row in rows)
    assert len(list((tmp_path / "run" / "out" / "pivots").glob("*.safetensors"))) == 4  # one pivot per image


@pytest.mark.parametrize("specs", ["colour", "bench"])
def test_edit_throughput_times_each_batch_size(specs, capsys):
    spec = importlib.util.spec_from_file_location("edit_throughput", SCRIPT.parent / "edit_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = module.main(
        ["--specs", specs, "--images", "3", "--steps", "3", "--batch-sizes", "1", "3", "--repeats", "1"]
    )
    assert record["specs"] == specs and [row["batch_size"] for row in record["rows"]] == [1, 3]
    assert all(row["seconds"] > 0 and math.isfinite(row["speedup"]) for row in record["rows"])
    assert all(
        len(row["page_faults_of_repeats"]) == 1 and row["page_faults_of_repeats"][0] >= 0 for row in record["rows"]
    )
    assert record["keep_freed_memory"] is (host_memory._glibc() is not None)  # the heap set as `nti` sets it
    assert [row[0] for row in table_rows(capsys.readouterr().out, "| specs per step |")] == ["1", "3"]


def test_unedited_region_gap_reruns_the_bench_edits_and_scores_each_reference(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["unedited_region_gap"])
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "root": "pie", "demo_samples": 3, "methods": ["ddim", "direct"], "output_dir": "out", "batch_size": 2,
        "model": {"pretrained": "shapes", "num_inference_steps": 5},
        "edit": {"blend_threshold": 0.7},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
        "score": {"dino": "none", "clip": "none", "lpips": "none", "device": "cpu"},
    }))
    spec = importlib.util.spec_from_file_location("unedited_region_gap", SCRIPT.parent / "unedited_region_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.main(["--config", str(config)])["table"]
    with (tmp_path / "out" / "pie_bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    bench = {
        m: sum(float(r["psnr_unedited"]) for r in rows if r["method"] == m) / 3
        for m in ("ddim", "direct", "vae_round_trip")
    }
    for method in ("ddim", "direct"):
        assert table[method]["samples"] == 3
        # the edits sampled again are the bench's (its settings, its overrides), and so is the VAE row
        assert table[method]["edit"] == pytest.approx(bench[method], abs=0.01)
        assert table[method]["vae"] == pytest.approx(bench["vae_round_trip"], abs=0.01)
        assert all(math.isfinite(table[method][column]) for column in ("vae + edit cells", "edit region: edit"))
    # Direct's source row retraces the pivot: it reconstructs as the VAE round trip
    assert table["direct"]["reconstruction"] == pytest.approx(table["direct"]["vae"], abs=0.05)
    assert table["ddim"]["reconstruction"] < table["ddim"]["vae"] - 1  # DDIM's at w = 7.5 does not
    assert [row[0] for row in table_rows(capsys.readouterr().out, "| method | edit |")] == ["ddim", "direct"]


@pytest.mark.slow  # three sections, each its own Python process
def test_gpu_check_rehearsal_goes_on_past_a_cut_section(tmp_path):
    import os
    import subprocess

    out = tmp_path / "gpu"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_TINY": "1", "GPU_CHECK_PIE_S": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT.parent / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    # the PIE-Bench run is cut at its 1 s limit; the two inversion sections still run and write their rows
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PIE-Bench-shaped nti bench: invert + edit + score per method: failed or cut at 1 s" in result.stdout
    assert "section(s) failed or were cut" in result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and (out / "sd15.txt").stat().st_size > 0 and (out / "sdxl.txt").stat().st_size > 0


def test_method_speed_times_each_method_alone_and_batched(capsys):
    spec = importlib.util.spec_from_file_location("method_speed", SCRIPT.parent / "method_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = module.main(["--model", "tiny", "--steps", "2", "--inner-steps", "1", "--batch-sizes", "1", "2",
                          "--methods", "ddpm", "edict", "--threads", "1"])
    assert [(row["method"], row["batch_size"]) for row in record["rows"]] == [
        ("ddpm", 1), ("ddpm", 2), ("edict", 1), ("edict", 2)
    ]
    assert all(row["invert_s_per_image"] > 0 and row["edit_s_per_image"] > 0 for row in record["rows"])
    assert "edict            B=2" in capsys.readouterr().out


def test_editor_speed_times_each_editor_alone_and_batched(capsys):
    spec = importlib.util.spec_from_file_location("editor_speed", SCRIPT.parent / "editor_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = module.main(["--model", "tiny", "--steps", "2", "--batch-sizes", "2", "--threads", "1"])
    assert [row["editor"] for row in record["rows"]] == ["p2p", "masactrl", "pnp", "p2p_zero"]
    assert all(row["alone_s_per_edit"] > 0 and row["batched_s_per_edit"] > 0 for row in record["rows"])
    assert "p2p_zero   B=2" in capsys.readouterr().out
