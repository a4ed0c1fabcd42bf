"""`nti predict` (the editing LightningCLI) on the tiny model, and the edit specs it reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nti_lightning import Inversion, load_pipeline
from nti_lightning.editing.cli import main
from nti_lightning.editing.data import edit_items
from nti_lightning.editing.specs import EditSpec, EditSpecError
from nti_lightning.models.text import encode_prompts

CONFIG = str(Path(__file__).parent / "configs" / "edit_tiny.yaml")
SOURCE = "a cat sitting on a sofa"
STEPS = 5


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A good inversion file for the tiny model, one of another model's width, and a truncated one."""
    folder = tmp_path_factory.mktemp("inversions")
    pipe = load_pipeline("tiny")
    generator = torch.Generator().manual_seed(0)
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    metadata = {"num_inference_steps": STEPS, "guidance_scale": 7.5, "model": "tiny"}
    good = Inversion(
        z_T=torch.randn(4, 8, 8, generator=generator),
        null_embeddings=empty.expand(STEPS, -1, -1) + 0.1 * torch.randn(STEPS, 77, 32, generator=generator),
        source_latent=torch.randn(4, 8, 8, generator=generator),
        prompt=SOURCE,
        metadata=metadata,
    )
    good.save(folder / "cat.safetensors")
    wide = Inversion(good.z_T, torch.zeros(STEPS, 77, 768), good.source_latent, SOURCE, {**metadata, "model": "sd-1.5"})
    wide.save(folder / "wide.safetensors")
    truncated = good.save(folder / "truncated.safetensors")
    truncated.write_bytes(truncated.read_bytes()[:200])
    return folder


def specs(folder: Path) -> list[dict]:
    cat = str(folder / "cat.safetensors")
    return [
        {"artifact": cat, "prompts": ["a dog sitting on a sofa"], "kind": "replace", "id": "dog",
         "options": {"cross_replace_steps": {"default_": 0.8, "dog": 0.4}, "blend_words": [["cat"], ["dog"]]}},
        {"artifact": cat, "prompts": [SOURCE, "a fluffy cat sitting on a sofa", "a cat sitting on a red sofa"],
         "kind": "refine"},
        {"artifact": cat, "prompts": [SOURCE], "kind": "reweight", "options": {"words": {"cat": 3.0}}},
        {"artifact": cat, "prompts": ["a big dog sitting on a sofa"], "kind": "replace", "id": "word-count"},
        {"artifact": cat, "prompts": ["a dog sitting on a sofa"], "kind": "reweight", "id": "missing-word",
         "options": {"words": {"tiger": 2.0}, "base": "replace"}},
        {"artifact": str(folder / "wide.safetensors"), "prompts": ["a dog"], "kind": "swap", "id": "other-model"},
        {"artifact": str(folder / "truncated.safetensors"), "prompts": ["a dog"], "kind": "swap", "id": "truncated"},
        {"artifact": cat, "prompts": ["a dog on a sofa"], "kind": "swap"},
    ]


@pytest.fixture(autouse=True)
def no_command_line(monkeypatch):
    """LightningCLI reads sys.argv too when given args; keep pytest's own arguments out of it."""
    monkeypatch.setattr(sys, "argv", ["nti"])


def test_predict_writes_every_good_edit_and_reports_the_bad_ones(artifacts, tmp_path, capsys):
    edits_file = tmp_path / "edits.jsonl"
    lines = [json.dumps(spec) for spec in specs(artifacts)]
    lines.insert(3, "{not json")
    edits_file.write_text("\n".join(lines) + "\n")
    out, runs = tmp_path / "edits", tmp_path / "runs"
    main(["predict", "--config", CONFIG, "--data.edits_file", str(edits_file),
          "--writer.output_dir", str(out), "--trainer.default_root_dir", str(runs)])

    for name, edits in (("dog", 1), ("cat_refine", 2), ("cat_reweight", 1), ("cat_swap", 1)):
        grid = Image.open(out / f"{name}.png")
        assert grid.width > (2 + edits) * 128 and grid.height > 128, name  # input | reconstruction | edits
        assert [Image.open(out / f"{name}_edit{k}.png").size for k in range(1, edits + 1)] == [(32, 32)] * edits
        assert Image.open(out / f"{name}_attention.png").width >= 6 * 128
    assert not (out / "cat_refine_edit3.png").exists()

    failures = {record["id"]: record for record in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert sorted(failures) == ["edits-line4", "missing-word", "other-model", "truncated", "word-count"]
    assert "not valid JSON" in failures["edits-line4"]["error"]
    assert "'a big dog sitting on a sofa' has 7" in failures["word-count"]["error"]
    assert "word 'tiger' is not in prompt 'a dog sitting on a sofa'" in failures["missing-word"]["error"]
    assert "wide.safetensors: null embeddings (5, 77, 768)" in failures["other-model"]["error"]
    assert "truncated.safetensors" in failures["truncated"]["error"]
    assert failures["truncated"]["where"].endswith("edits.jsonl:8")

    # the resolved config beside the edits, and a summary line as `nti fit` ends with
    assert "edits_file: " + str(edits_file) in (out / "config.yaml").read_text()
    assert not list(runs.rglob("config.yaml"))
    assert (
        f"nti: 4 edit(s) written, 5 failed; pictures in {out}, failures in {out / 'failures.jsonl'}"
        in capsys.readouterr().out
    )
    (events,) = runs.rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload().Tags()["images"]
    assert {"edit/dog", "attention/dog", "edit/cat_refine"} <= set(logged) and "edit/truncated" not in logged


def test_predict_edits_with_every_editor_and_reports_each_editors_mistakes(artifacts, tmp_path, capsys):
    cat = str(artifacts / "cat.safetensors")
    dog = [SOURCE, "a dog sitting on a sofa"]
    edits = [
        {"artifact": cat, "prompts": dog, "editor": "masactrl", "id": "masactrl"},
        {"artifact": cat, "prompts": dog, "editor": "pnp", "options": {"feature_steps": 0.6}, "id": "pnp"},
        {"artifact": cat, "prompts": dog, "editor": "p2p_zero", "id": "p2p_zero"},
        {"artifact": cat, "prompts": dog, "kind": "replace", "id": "p2p"},
        {"artifact": cat, "prompts": dog, "editor": "sdedit", "id": "unknown"},
        {"artifact": cat, "prompts": dog, "editor": "masactrl", "options": {"start_layer": 17}, "id": "layer"},
        {"artifact": cat, "prompts": dog, "editor": "masactrl", "kind": "replace", "id": "kind"},
        {"artifact": cat, "prompts": [SOURCE, SOURCE], "editor": "p2p_zero", "id": "unchanged"},
    ]
    out = tmp_path / "edits"
    main(["predict", "--config", CONFIG, "--data.edits", json.dumps(edits), "--writer.output_dir", str(out),
          "--trainer.logger", "false"])
    for name in ("masactrl", "pnp", "p2p_zero", "p2p"):
        assert Image.open(out / f"{name}_edit1.png").size == (32, 32), name
    # Plug-and-Play's source branch runs under "": no maps of the source prompt to draw.
    assert (out / "masactrl_attention.png").is_file() and not (out / "pnp_attention.png").exists()
    records = map(json.loads, (out / "failures.jsonl").read_text().splitlines())
    failures = {record["id"]: record["error"] for record in records}
    assert sorted(failures) == ["kind", "layer", "unchanged", "unknown"]
    assert "unknown editor 'sdedit'" in failures["unknown"]
    assert "start_layer must be a whole number from 0 to 16, got 17" in failures["layer"]
    assert "'kind' is Prompt-to-Prompt's" in failures["kind"]
    assert "changes no word of the source" in failures["unchanged"]
    assert "4 edit(s) written, 4 failed" in capsys.readouterr().out


def test_inline_edits_and_a_clean_run_clears_old_failures(artifacts, tmp_path):
    out = tmp_path / "edits"
    out.mkdir()
    (out / "failures.jsonl").write_text('{"id": "from an earlier run"}\n')
    inline = [{"artifact": str(artifacts / "cat.safetensors"), "prompts": ["a dog sitting on a sofa"], "id": "dog"}]
    main(["predict", "--config", CONFIG, "--data.edits", json.dumps(inline), "--writer.output_dir", str(out),
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false", "--model.attention_maps",
          "false"])
    assert (out / "dog.png").is_file() and (out / "dog_edit1.png").is_file()
    assert not (out / "dog_attention.png").exists() and not (out / "failures.jsonl").exists()


def test_the_shipped_config_parses_and_its_specs_are_valid(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(Path(__file__).parents[1] / "configs" / "edit.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["writer"]["output_dir"] == "edits"
    kinds = [EditSpec.from_dict(spec, str(i)).kind for i, spec in enumerate(config["data"]["edits"])]
    assert kinds == ["replace", "refine", "reweight", "swap", "masactrl", "pnp", "p2p_zero"]


def test_specs_are_validated_with_the_field_named():
    good = {"artifact": "x.safetensors", "prompts": ["a dog"]}
    assert EditSpec.from_dict(good, "a").kind == "replace"
    for raw, message in [
        ({**good, "kind": "morph"}, "unknown kind 'morph'"),
        ({**good, "kind": "swap", "options": {"blend_words": [["cat"]]}}, r"\['blend_words'\] do not apply"),
        ({**good, "kind": "reweight"}, "needs options.words"),
        ({**good, "prompts": []}, "'prompts' must be a non-empty list"),
        ({"prompts": ["a dog"]}, "'artifact' must be the path"),
        ({**good, "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        (["a dog"], "must be an object"),
    ]:
        with pytest.raises(EditSpecError, match=message):
            EditSpec.from_dict(raw, "a")


def test_source_prompt_goes_first_unless_the_spec_already_starts_with_it():
    spec = EditSpec("a", "x.safetensors", ["a cat"])
    assert spec.all_prompts("a cat") == ["a cat", "a cat"]  # reweight the source itself
    assert EditSpec("a", "x", ["a dog"]).all_prompts("a cat") == ["a cat", "a dog"]
    assert EditSpec("a", "x", ["a cat", "a dog"]).all_prompts("a cat") == ["a cat", "a dog"]


def test_ids_are_unique_and_file_name_safe(tmp_path):
    edits = [{"artifact": "in/cat.safetensors", "prompts": ["a"]}, {"artifact": "cat.safetensors", "prompts": ["b"]},
             {"id": "../up/../x y", "artifact": "z", "prompts": ["c"]}, "not a spec"]
    items = edit_items(edits, None)
    # An id of its own names output files: one that would leave the folder is refused, not rewritten.
    assert [item["id"] for item in items] == ["cat_replace", "cat_replace-2", "z_replace", "edit3"]
    assert "edits[2]: id '../up/../x y' holds a path separator" == items[2]["error"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        edit_items([], str(tmp_path / "missing.jsonl"))


def test_without_the_reconstruction_the_edits_are_the_same_and_inputs_can_be_saved(artifacts, tmp_path):
    """`model.reconstruction false` (what `nti bench` runs) skips the source's plain sampling and
    changes no edit; `writer.save_inputs` adds the VAE round trip of each input."""
    chosen = [spec for spec in specs(artifacts) if spec.get("id") in ("dog", None)][:2]  # a blended replace, a refine
    edits_file = tmp_path / "edits.jsonl"
    edits_file.write_text("\n".join(json.dumps(spec) for spec in chosen) + "\n")
    common = ["predict", "--config", CONFIG, "--data.edits_file", str(edits_file), "--trainer.logger", "false",
              "--model.attention_maps", "false"]
    main([*common, "--writer.output_dir", str(tmp_path / "full")])
    main([*common, "--writer.output_dir", str(tmp_path / "lean"), "--model.reconstruction", "false",
          "--writer.save_inputs", "true"])
    for name, edits in (("dog", 1), ("cat_refine", 2)):
        for k in range(1, edits + 1):
            full = np.asarray(Image.open(tmp_path / "full" / f"{name}_edit{k}.png"), dtype=int)
            lean = np.asarray(Image.open(tmp_path / "lean" / f"{name}_edit{k}.png"), dtype=int)
            assert np.abs(full - lean).max() <= 1, name  # a smaller batch: float rounding at most
        assert Image.open(tmp_path / "lean" / f"{name}.png").width < Image.open(tmp_path / "full" / f"{name}.png").width
        assert (tmp_path / "lean" / f"{name}_input.png").is_file() and not (
            tmp_path / "full" / f"{name}_input.png"
        ).exists()
    assert not (tmp_path / "lean" / "cat_refine_edit3.png").exists()
