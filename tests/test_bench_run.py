"""`nti bench --config`: the offline shapes benchmark inverted, edited and scored for several
methods on the tiny model, in PIE-Bench's layout, and a rerun that redoes nothing finished."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT

from nti_lightning.bench.metrics import psnr_unedited
from nti_lightning.bench.shapes_set import write_shapes_bench
from nti_lightning.cli import main
from nti_lightning.data.pie_bench import read_mapping
from nti_lightning.data.pie_masks import decode_mask
from nti_lightning.demo.shapes import (
    BACKGROUND_COLORS,
    SHAPE_COLORS,
    heldout_samples,
    render,
)
from nti_lightning.errors import OptionError
from nti_lightning.inversion.artifact import Inversion


def test_the_offline_benchmark_is_pie_bench_shaped(tmp_path):
    samples, failures = read_mapping(write_shapes_bench(tmp_path, 6, start=3))
    assert not failures and [s.editing_type_id for s in samples] == ["6", "1", "8"] * 2
    for sample, source in zip(samples, heldout_samples(6, start=3)):
        assert sample.original_prompt == source.caption and sample.image.is_file()
        mask = decode_mask(sample.mask, (32, 32), sample=sample.id).astype(bool)
        touched = source.coverage > 0
        inner = np.zeros_like(touched)
        inner[1:-1, 1:-1] = True  # the border is the benchmark's: always 1
        if sample.editing_type_id == "6":  # recolour: every pixel the shape touches, edge included
            assert np.array_equal(mask[inner], touched[inner]) and sample.blended_word == (source.shape, source.shape)
            perfect, _ = render(
                source.shape, SHAPE_COLORS[sample.editing_prompt.split()[1]], source.background_rgb, source.box
            )
        elif sample.editing_type_id == "8":  # background: every pixel the shape does not cover whole
            assert np.array_equal(mask[inner], source.coverage[inner] < 1)
            assert sample.blended_word == ("background", "background")
            perfect, _ = render(
                source.shape, source.shape_rgb, BACKGROUND_COLORS[sample.editing_prompt.split()[-2]], source.box
            )
        else:  # another shape: the shape and its box
            assert mask[touched].all() and sample.blended_word[0] == source.shape != sample.blended_word[1]
            perfect, _ = render(sample.blended_word[1], source.shape_rgb, source.background_rgb, source.box)
        assert sample.editing_prompt != sample.original_prompt
        # exact masks: the edit the generator draws keeps the unedited region to the bit
        assert psnr_unedited(source.image, perfect, mask) == float("inf")
        assert psnr_unedited(source.image, perfect, np.zeros_like(mask)) < 40  # and it is an edit


def test_bench_inverts_edits_scores_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nti"])
    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "root": "pie",
                "demo_samples": 3,
                "methods": ["ddim", "null_text", "direct"],
                "editors": ["p2p", "masactrl", "pnp", "p2p_zero"],
                "output_dir": "out",
                "batch_size": 2,
                "model": {"pretrained": "tiny", "num_inference_steps": 4, "num_inner_steps": 2},
                "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
                "score": {"dino": "none", "clip": "none", "lpips": "none", "device": "cpu"},
            }
        )
    )
    main(["bench", "--config", str(config)])
    samples, _ = read_mapping(tmp_path / "pie" / "mapping_file.json")
    out = tmp_path / "out"
    files = {}
    for method in ("ddim", "null_text", "direct"):
        for sample in samples:
            strip = out / method / "annotation_images" / sample.image_path
            assert strip.is_file() and (out / method / "inversions" / f"{sample.id}.safetensors").is_file()
            files[strip] = strip.stat().st_mtime_ns
            artifact = out / method / "inversions" / f"{sample.id}.safetensors"
            files[artifact] = artifact.stat().st_mtime_ns
    # one pivot per image, computed by the first method and read by the others
    pivots = sorted(out.glob("pivots/*.safetensors"))
    assert [p.stem for p in pivots] == sorted(s.id for s in samples)
    last_ddim = max(p.stat().st_mtime_ns for p in (out / "ddim" / "inversions").glob("*.safetensors"))
    assert all(p.stat().st_mtime_ns <= last_ddim for p in pivots)  # the later methods only read them
    files.update({p: p.stat().st_mtime_ns for p in pivots})
    # the other editors edit DDIM's and Direct's inversions (MasaCtrl's made again with the prompt "")
    editor_rows = [f"{m}+{e}" for m in ("ddim", "direct") for e in ("masactrl", "pnp", "p2p_zero")]
    for row in editor_rows:
        for sample in samples:
            strip = out / row / "annotation_images" / sample.image_path
            assert strip.is_file(), strip
            files[strip] = strip.stat().st_mtime_ns
    assert {Inversion.load(p).prompt for p in (out / "direct+masactrl" / "inversions").glob("*.safetensors")} == {""}
    assert not (out / "ddim+pnp" / "inversions").exists()  # Plug-and-Play edits DDIM's own inversions
    specs = [json.loads(line) for line in (out / "direct+p2p_zero" / "edits.jsonl").read_text().splitlines()]
    assert all(spec["options"]["retrace"] and "pix2pix_zero/inversions" in spec["artifact"] for spec in specs), specs
    with (out / "pie_bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    methods = ("ddim", "null_text", "direct", *editor_rows, "vae_round_trip")
    assert sorted((row["method"], row["id"]) for row in rows) == sorted((m, s.id) for m in methods for s in samples)
    assert all(float(row["psnr_unedited"]) > 0 for row in rows)
    timings = [json.loads(line) for line in (out / "bench_timings.jsonl").read_text().splitlines()]
    assert {(t["method"], t["stage"], t["items"]) for t in timings} == {
        *((m, stage, 3) for m in methods[:3] for stage in ("invert", "edit")),
        *((row, "edit", 3) for row in editor_rows),
        *((f"{m}+masactrl", "invert", 3) for m in ("ddim", "direct")),
        ("pix2pix_zero", "invert", 3),  # Pix2Pix-Zero's own inversion, for its DDIM and Direct rows
        ("all", "score", 3 * len(methods)),
    }
    summary = (out / "pie_bench.md").read_text()
    assert "null_text" in summary and "direct" in summary and "n/a" in summary  # DINO and CLIP: no weights here

    # as if killed before the last strip of one method and an artifact of another were written
    lost_strip = out / "direct" / "annotation_images" / samples[-1].image_path
    lost_artifact = out / "ddim" / "inversions" / f"{samples[0].id}.safetensors"
    lost_strip.unlink()
    lost_artifact.unlink()
    main(["bench", "--config", str(config)])
    for path, stamp in files.items():
        if path not in (lost_strip, lost_artifact):
            assert path.stat().st_mtime_ns == stamp, path  # finished work is not redone
    assert lost_strip.is_file() and lost_artifact.is_file()


def test_bench_config_mistakes_are_named(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("methods: [null_text, magic]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--config", str(config)])
    assert exit_info.value.code == 2
    from nti_lightning.bench.run import BenchConfig

    with pytest.raises(OptionError, match=r"methods: \['magic'\] not among"):
        BenchConfig.load(config)
    config.write_text("rooot: x\n")
    with pytest.raises(OptionError, match=r"rooot: unknown key \(did you mean root\?\)"):
        BenchConfig.load(config)
    with pytest.raises(OptionError, match=r"batch_size: must be at least 1, got 0"):
        BenchConfig(batch_size=0).checked()  # a config made in Python is checked as a file's is
    with pytest.raises(OptionError, match=r"editors: \['sdedit'\] not among"):
        BenchConfig(editors=["p2p", "sdedit"]).checked()
    cannot = r"editor_methods: edict's inversions cannot be edited by \['masactrl', 'pnp'\]"
    with pytest.raises(OptionError, match=cannot):
        BenchConfig(methods=["edict"], editors=["masactrl", "pnp"], editor_methods=["edict"]).checked()
    with pytest.raises(OptionError, match=r"editor_methods: \['direct'\] not among the methods run"):
        BenchConfig(methods=["ddim"], editors=["pnp"], editor_methods=["ddim", "direct"]).checked()
    checked = BenchConfig(methods=["ddpm"], editors=["masactrl"], editor_methods=["ddpm"]).checked()
    assert checked.editors == ["masactrl"]  # MasaCtrl is an attention hook: any sampling


@pytest.mark.parametrize("args, culprit", [
    ([], "nothing to do"),
    (["--config", "{config}", "--rooot", "x"], "Unrecognized arguments: --rooot"),
    (["--config", "{config}", "--bench.root", "x"], "--bench.root is an option of scoring a folder: add --score DIR"),
])
def test_bench_command_line_mistakes_are_one_error_line(tmp_path, args, culprit, capsys):
    from nti_lightning.bench.run import main as bench_main

    config = tmp_path / "bench.yaml"
    config.write_text("root: pie\n")
    with pytest.raises(OptionError, match=re.escape(culprit)) as error:
        bench_main([word.format(config=config) for word in args])
    assert "--score DIR" in str(error.value)  # the other way to call it
    assert capsys.readouterr().err == ""  # jsonargparse printed no usage of its own


def test_bench_help_lists_every_key_and_both_ways(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    # the two ways to call it, first
    assert "nti bench --config FILE" in printed and "nti bench --score DIR --bench.root ROOT" in printed
    for key in ("--config", "--root", "--output_dir", "--methods", "--batch_size", "--demo_samples", "--share_pivots",
                "--model.num_inner_steps", "--model.pretrained", "--trainer.accelerator", "--trainer.precision",
                "--edit.cross_replace_steps", "--score.dino", "--score DIR", "--bench.root ROOT", "--bench.methods"):
        assert key in printed, key
    # each key with its type and default: a run's own and the model's (the bench's default model)
    assert "(type: int, default: 8)" in printed and "default: CompVis/stable-diffusion-v1-4" in printed
    assert "--model.method " not in printed and "--model.output_dir" not in printed  # set by the bench


def test_command_line_overrides_reach_the_stages(tmp_path, monkeypatch, capsys):
    """`--model.num_inner_steps 5` overrides the YAML's model.num_inner_steps (as `nti fit`'s do),
    `--root` and `--output_dir` the YAML's keys, and `nti fit` gets what results."""
    from nti_lightning.bench import run
    from nti_lightning.bench.options import parse_run_args

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"root": "pie", "output_dir": "out", "methods": ["null_text"], "demo_samples": 2,
                                      "model": {"pretrained": "tiny", "num_inner_steps": 10}}))
    words = ["--config", str(config), "--model.num_inner_steps", "5", "--root", "other", "--output_dir", "elsewhere"]
    loaded = parse_run_args(words)
    assert loaded.model == {"pretrained": "tiny", "num_inner_steps": 5}
    assert (loaded.root, loaded.output_dir, loaded.methods) == ("other", "elsewhere", ["null_text"])
    stages = []
    monkeypatch.setattr(run, "_stage_runner", lambda trainer: stages.append)  # record the stages, run none
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *words])
    assert exit_info.value.code == 2 and "no method produced an edit" in capsys.readouterr().err
    fit = stages[0]
    assert fit[0] == "fit" and fit[fit.index("--model.num_inner_steps") + 1] == "5"
    assert fit[fit.index("--data.manifest") + 1] == str(Path("other") / "mapping_file.json")


def test_every_mistake_of_a_config_is_one_line_before_any_file_is_read(tmp_path, capsys):
    """Several mistakes and a root that does not exist: every mistake, each with its key, in one
    `nti: error:` line and exit status 2, and not a word about the root; once they are fixed, the root."""
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(tmp_path / "no-such-root"), "batch_size": -3, "methods": ["null_text", "magic"], "rooot": 1,
        "model": {"num_inner_steps": "many", "method": "ddim"}, "trainer": {"precision": "bf17"},
        "edit": {"blend_start": 2.0}, "score": {"device": "tpu-ish"},
    }))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--config", str(config), "--demo_resolution", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nti: error: nti bench: the config has 9 mistakes: "), err
    for culprit in ("batch_size: must be at least 1, got -3", "methods: ['magic'] not among", "rooot: unknown key",
                    "model.num_inner_steps: expected int, got 'many'", "model.method: set by nti bench",
                    "trainer.precision: expected one of", "'bf17'", "edit.blend_start: must be a fraction",
                    "score.device: 'tpu-ish' is not a device name", "demo_resolution: must be at least 8, got 4"):
        assert culprit in lines[0], culprit
    assert "no-such-root" not in err and "mapping_file" not in err
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "no-such-root"), "methods": ["null_text"]}))
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(config)])
    assert "no-such-root/mapping_file.json: no PIE-Bench mapping file" in capsys.readouterr().err


def test_the_mistakes_are_one_line_and_help_has_status_0(tmp_path, nti_main):
    """`nti bench` as a user runs it: the config's mistakes on one line with status 2 and no
    traceback, the missing root not reached; `--help` lists the keys, status 0."""
    config = tmp_path / "bench.yaml"
    config.write_text("root: no-such-root\nbatch_size: -3\nmethods: [null_text, magic]\nmodel: {num_inner_steps: 0}\n")
    result = nti_main("bench", "--config", str(config), "--trainer.precision", "bf17", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("nti: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for culprit in ("batch_size", "magic", "model.num_inner_steps", "trainer.precision"):
        assert culprit in lines[0], culprit
    assert "no-such-root" not in result.stderr
    shown = nti_main("bench", "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "--model.num_inner_steps" in shown.stdout and "--score DIR" in shown.stdout


def test_bench_on_two_devices_runs_each_stage_across_both(tmp_path, monkeypatch):
    """`trainer.devices: 2`: each stage is a child `nti` process that Lightning starts on both
    devices (two CPU processes here), each image inverted, its pivot stored and edited once. (One
    method: another method reading the stored pivots is checked on one device, above.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "root": "pie", "demo_samples": 4, "methods": ["null_text"], "output_dir": "out", "batch_size": 1,
        "model": {"pretrained": "tiny", "num_inference_steps": 4, "num_inner_steps": 2},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        "score": {"dino": "none", "clip": "none", "lpips": "none", "device": "cpu"},
    }))
    main(["bench", "--config", str(config)])
    samples, _ = read_mapping(tmp_path / "pie" / "mapping_file.json")
    out = tmp_path / "out"
    rows = json.loads((out / "null_text" / "inversions" / "report.json").read_text())["images"]
    assert sorted(row["id"] for row in rows) == sorted(s.id for s in samples)  # each image once
    assert all((out / "null_text" / "annotation_images" / s.image_path).is_file() for s in samples)
    assert len(list(out.glob("pivots/*.safetensors"))) == 4  # each image's pivot, stored once
    with (out / "pie_bench.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 4  # the method and the VAE round trip
