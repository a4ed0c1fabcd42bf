"""PIE-Bench's mapping file read by `nti fit` (as a manifest) and `nti predict` (as edits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, random_image

from nti_lightning import Inversion
from nti_lightning.cli import main
from nti_lightning.data.pie_bench import read_mapping, strip_brackets
from nti_lightning.editing.pie_bench import benchmark_edit
from nti_lightning.editing.specs import EditSpec
from nti_lightning.errors import BenchmarkError

SAMPLES = {
    "000000000000": {
        "image_path": "0_random_140/000000000000.jpg", "original_prompt": "a cat sitting on a sofa",
        "editing_prompt": "a [dog] sitting on a sofa", "editing_instruction": "make the cat a dog",
        "editing_type_id": "1", "blended_word": "cat dog", "mask": [10, 5, 40, 300],
    },
    "911000000001": {
        "image_path": "9_change_style_70/1_artificial/1_animal/911000000001.jpg",
        "original_prompt": "a photo of a horse", "editing_prompt": "a [watercolor painting] of a horse",
        "editing_instruction": "", "editing_type_id": "9", "blended_word": "", "mask": [0, 1024],
    },
    "100000000002": {"image_path": "x.jpg", "original_prompt": "a tree", "editing_prompt": "a [red] tree",
                     "editing_type_id": "12", "blended_word": "", "mask": []},
    "100000000003": {"image_path": "y.jpg", "original_prompt": "a tree"},
}


def write_bench(root: Path) -> Path:
    """A PIE-Bench-format folder: mapping_file.json and annotation_images/ (two usable samples)."""
    for seed, entry in enumerate(list(SAMPLES.values())[:2]):
        image = root / "annotation_images" / entry["image_path"]
        image.parent.mkdir(parents=True, exist_ok=True)
        random_image(seed, (40, 40)).save(image)
    mapping = root / "mapping_file.json"
    mapping.write_text(json.dumps(SAMPLES))
    return mapping


def test_the_mapping_file_reads_as_samples_and_reasons(tmp_path):
    samples, failures = read_mapping(write_bench(tmp_path))
    cat, horse = samples
    assert cat.id == "000000000000" and cat.image == tmp_path / "annotation_images/0_random_140/000000000000.jpg"
    assert (cat.original_prompt, cat.editing_prompt, cat.blended_word) == (
        "a cat sitting on a sofa",
        "a dog sitting on a sofa",
        ("cat", "dog"),
    )
    assert horse.editing_prompt == "a watercolor painting of a horse" and horse.blended_word is None
    assert horse.editing_type_id == "9" and horse.mask == [0, 1024]
    reasons = dict(failures)
    assert "editing_type_id '12' is not one of" in reasons["100000000002"]
    assert "missing editing_prompt, editing_type_id, blended_word, mask" in reasons["100000000003"]
    assert strip_brackets("[a] b [c d]") == "a b c d"
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(BenchmarkError, match="list.json: a mapping file is a JSON object keyed by sample id"):
        read_mapping(tmp_path / "list.json")


def test_the_benchmarks_edit_settings(tmp_path):
    cat, horse = read_mapping(write_bench(tmp_path))[0]
    spec = benchmark_edit(cat, "inv/000000000000.safetensors")
    assert spec == {
        "id": "000000000000", "artifact": "inv/000000000000.safetensors",
        "prompts": ["a cat sitting on a sofa", "a dog sitting on a sofa"], "kind": "reweight",
        "options": {"cross_replace_steps": 0.4, "self_replace_steps": 0.6, "blend_words": [["cat"], ["dog"]],
                    "blend_threshold": 0.3, "blend_start": 0.2, "words": {"dog": 2.0}, "base": "refine"},
    }
    plain = benchmark_edit(horse, "h.safetensors", {"cross_replace_steps": 0.8})
    assert plain["kind"] == "refine" and plain["options"] == {"cross_replace_steps": 0.8, "self_replace_steps": 0.6}
    for made in (spec, plain):
        EditSpec.from_dict(made, made["id"])  # what nti predict accepts
    with pytest.raises(BenchmarkError, match="unknown benchmark edit setting"):
        benchmark_edit(cat, "x", {"cross_steps": 1})


def test_fit_and_predict_run_the_benchmarks_file(tmp_path, monkeypatch):
    mapping = write_bench(tmp_path / "PIE-Bench_v1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nti"])
    with pytest.raises(SystemExit) as exit_info:  # two samples cannot be used: status 1
        main(["fit", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--trainer.logger", "false",
              "--data.manifest", str(mapping), "--model.output_dir", "inversions"])
    assert exit_info.value.code == 1
    inverted = sorted(p.stem for p in (tmp_path / "inversions").glob("*.safetensors"))
    assert inverted == ["000000000000", "911000000001"]
    assert Inversion.load(tmp_path / "inversions/000000000000.safetensors").prompt == "a cat sitting on a sofa"
    failures = (tmp_path / "inversions" / "failures.jsonl").read_text()
    assert "100000000002" in failures and "100000000003" in failures

    from nti_lightning.editing.cli import main as predict_main

    predict_main(["predict", "--config", str(ROOT / "tests/configs/edit_tiny.yaml"), "--trainer.logger", "false",
                  "--data.benchmark", str(mapping), "--data.inversions", "inversions", "--writer.output_dir", "edits"])
    assert (tmp_path / "edits" / "000000000000_edit1.png").exists() and (
        tmp_path / "edits" / "911000000001_edit1.png"
    ).exists()
    failed = [json.loads(line)["id"] for line in (tmp_path / "edits" / "failures.jsonl").read_text().splitlines()]
    assert sorted(failed) == ["100000000002", "100000000003"]
