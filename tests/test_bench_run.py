"""`nti bench --config`: the offline shapes benchmark inverted, edited and scored for several
methods on the tiny model, in PIE-Bench's layout, and a rerun that redoes nothing finished."""

from __future__ import annotations

import csv
import json
import sys

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
            perfect, _ = render(source.shape, SHAPE_COLORS[sample.editing_prompt.split()[1]], source.background_rgb, source.box)
        elif sample.editing_type_id == "8":  # background: every pixel the shape does not cover whole
            assert np.array_equal(mask[inner], source.coverage[inner] < 1)
            assert sample.blended_word == ("background", "background")
            perfect, _ = render(source.shape, source.shape_rgb, BACKGROUND_COLORS[sample.editing_prompt.split()[-2]], source.box)
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
    config.write_text(yaml.safe_dump({
        "root": "pie", "demo_samples": 3, "methods": ["ddim", "null_text", "direct"], "output_dir": "out", "batch_size": 2,
        "model": {"pretrained": "tiny", "num_inference_steps": 4, "num_inner_steps": 2},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
        "score": {"dino": "none", "clip": "none", "lpips": "none", "device": "cpu"},
    }))
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
    files.update({p: p.stat().st_mtime_ns for p in pivots})
    with (out / "pie_bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    methods = ("ddim", "null_text", "direct", "vae_round_trip")
    assert sorted((row["method"], row["id"]) for row in rows) == sorted((m, s.id) for m in methods for s in samples)
    assert all(float(row["psnr_unedited"]) > 0 for row in rows)
    timings = [json.loads(line) for line in (out / "bench_timings.jsonl").read_text().splitlines()]
    assert {(t["method"], t["stage"], t["items"]) for t in timings} == {
        *((m, stage, 3) for m in methods[:3] for stage in ("invert", "edit")), ("all", "score", 12)}
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

    with pytest.raises(OptionError, match=r"bench.yaml: methods \['magic'\] not among"):
        BenchConfig.load(config)
    config.write_text("rooot: x\n")
    with pytest.raises(OptionError, match=r"unknown key\(s\) \['rooot'\]"):
        BenchConfig.load(config)


@pytest.mark.parametrize("args, culprit", [([], "required: --config"), (["--config", "b.yaml", "--rooot", "x"], "unrecognized arguments: --rooot")])
def test_bench_command_line_mistakes_are_one_error_line(args, culprit, capsys):
    from nti_lightning.bench.run import main as bench_main

    with pytest.raises(OptionError, match=culprit) as error:
        bench_main(args)
    assert "--score DIR" in str(error.value)  # the other way to call it
    assert capsys.readouterr().err == ""  # argparse printed no usage of its own


def test_bench_on_two_devices_runs_each_stage_across_both(tmp_path, monkeypatch):
    """`trainer.devices: 2`: each stage is a child `nti` process that Lightning starts on both
    devices (two CPU processes here), each image inverted and edited once, the pivots shared."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "root": "pie", "demo_samples": 4, "methods": ["ddim", "null_text"], "output_dir": "out", "batch_size": 1,
        "model": {"pretrained": "tiny", "num_inference_steps": 4, "num_inner_steps": 2},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        "score": {"dino": "none", "clip": "none", "lpips": "none", "device": "cpu"},
    }))
    main(["bench", "--config", str(config)])
    samples, _ = read_mapping(tmp_path / "pie" / "mapping_file.json")
    out = tmp_path / "out"
    for method in ("ddim", "null_text"):
        rows = json.loads((out / method / "inversions" / "report.json").read_text())["images"]
        assert sorted(row["id"] for row in rows) == sorted(s.id for s in samples)  # each image once
        assert all((out / method / "annotation_images" / s.image_path).is_file() for s in samples)
    last_ddim = max(p.stat().st_mtime_ns for p in (out / "ddim" / "inversions").glob("*.safetensors"))
    pivots = list(out.glob("pivots/*.safetensors"))
    assert len(pivots) == 4 and all(p.stat().st_mtime_ns <= last_ddim for p in pivots)  # null_text only read them
    with (out / "pie_bench.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3 * 4  # two methods and the VAE round trip
