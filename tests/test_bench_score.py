"""Scoring a folder of PIE-Bench outputs: a tiny benchmark in the authors' layout, two methods,
strips of four panels, small random DINO and CLIP models saved as local folders.

Every CSV value is checked against tests/bench_reference.py applied to the images read back from
disk (the edit cut out of the strip with numpy), and the summary against means of the CSV.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import bench_reference as ref
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_bench_metrics import edited, image, small_clip, small_vit

from nti_lightning.bench.metrics import METRICS
from nti_lightning.bench.score import edit_panel, main, score_folder
from nti_lightning.bench.summary import PAPER_SCALE
from nti_lightning.cli import EXIT_USAGE, help_text
from nti_lightning.cli import main as nti_main
from nti_lightning.errors import EXIT_SOME_FAILED, BenchmarkError, NtiError
from nti_lightning.models.tokenizer import clip_tokenizer

SIDE = 64
#: id -> (image_path, editing_type_id, editing_prompt, mask runs)
SAMPLES = {
    "000000000000": ("0_random_140/000000000000.jpg", "0", "a [red] cat on a sofa", [10 * 64 + 5, 200, 40 * 64, 300]),
    "111000000000": (
        "1_change_object_80/1_artificial/1_animal/111000000000.jpg",
        "1",
        "a [dog] in the snow",
        [20 * 64 + 20, 20, 21 * 64 + 20, 20, 22 * 64 + 20, 20],
    ),
    "211000000000": ("2_add_object_80/1_artificial/1_animal/211000000000.jpg", "2", "a bird [with a hat]", [100, 900]),
    "900000000000": (
        "9_change_style_40/1_artificial/1_animal/900000000000.jpg",
        "9",
        "a [watercolor] painting",
        [0, 64 * 64],
    ),
}
METHODS = {"ddim+p2p": 11, "null-text-inversion+p2p": 12}
MISSING = ("null-text-inversion+p2p", "211000000000")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(root, outputs, dino folder, clip folder) of a four-image benchmark with two methods."""
    base = tmp_path_factory.mktemp("pie")
    root, outputs = base / "PIE-Bench_v1", base / "output"
    mapping = {}
    for n, (key, (path, kind, prompt, runs)) in enumerate(SAMPLES.items()):
        mapping[key] = {"image_path": path, "original_prompt": prompt.replace("[", "").replace("]", ""),
                        "editing_prompt": prompt, "editing_instruction": "", "editing_type_id": kind,
                        "blended_word": "", "mask": runs}
        source = image(20 + n, (SIDE, SIDE))
        (root / "annotation_images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source).save(root / "annotation_images" / path)
        for method, seed in METHODS.items():
            if (method, key) == MISSING:
                continue
            strip = np.concatenate([np.full((SIDE, SIDE, 3), 255, np.uint8), source, edited(source, seed),
                                    edited(source, seed + 100 + n)], axis=1)
            target = outputs / method / "annotation_images" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(strip).save(target)
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    small_vit().save_pretrained(base / "dino")
    clip = base / "clip"
    small_clip().save_pretrained(clip)
    clip_tokenizer().save_pretrained(clip)
    return root, outputs, base / "dino", clip


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def expected_rows(root: Path, outputs: Path, dino: Path, clip: Path) -> dict:
    from transformers import CLIPModel, ViTModel

    vit = ViTModel.from_pretrained(dino, add_pooling_layer=False).eval()
    clip_model = CLIPModel.from_pretrained(clip).eval()
    tokenizer = clip_tokenizer()
    rows = {}
    for key, (path, kind, prompt, runs) in SAMPLES.items():
        source = _read(root / "annotation_images" / path)
        mask = ref.decode(runs, SIDE, SIDE)
        text = prompt.replace("[", "").replace("]", "")
        for method in METHODS:
            if (method, key) == MISSING:
                continue
            edit = _read(outputs / method / "annotation_images" / path)[:, -SIDE:]
            rows[key, method] = {
                "editing_type_id": kind,
                "structure_distance": ref.structure_distance(vit, source, edit, layer=1, eps=1e-6),
                "psnr_unedited": ref.psnr(source, edit, mask),
                "mse_unedited": ref.mse(source, edit, mask),
                "ssim_unedited": ref.ssim(source, edit, mask),
                "clip_whole": ref.clip_score(clip_model, tokenizer, edit, text),
                "clip_edited": ref.clip_score(clip_model, tokenizer, edit, text, mask),
            }
    return rows


TOLERANCE = {"structure_distance": dict(rel=1e-4), "psnr_unedited": dict(abs=1e-4), "mse_unedited": dict(rel=1e-5),
             "ssim_unedited": dict(abs=2e-5), "clip_whole": dict(abs=1e-4), "clip_edited": dict(abs=1e-4)}


@pytest.fixture(scope="module")
def scored(bench, tmp_path_factory):
    root, outputs, dino, clip = bench
    out = tmp_path_factory.mktemp("scores")
    result = score_folder(root, outputs, dino=str(dino), clip=str(clip), lpips="none", device="cpu",
                          csv_path=out / "rows.csv", markdown_path=out / "summary.md", tensorboard_dir=out / "tb")
    return result, out


def test_csv_rows_are_the_evaluators_formulas(bench, scored):
    result, out = scored
    with open(out / "rows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "method", "editing_type_id", *METRICS, "error"]
    assert not any(row["error"] for row in rows) and result.failed == []
    expected = expected_rows(*bench)
    assert {(r["id"], r["method"]) for r in rows} == set(expected)  # the missing output is not a row
    for row in rows:
        want = expected[row["id"], row["method"]]
        assert row["editing_type_id"] == want["editing_type_id"]
        assert row["lpips_unedited"] == "n/a"
        for metric, tolerance in TOLERANCE.items():
            if math.isnan(want[metric]):
                assert row[metric] == "nan", (row["id"], metric)
            else:
                assert float(row[metric]) == pytest.approx(want[metric], **tolerance), (row["id"], metric)
    assert sum(r["psnr_unedited"] == "nan" for r in rows) == 2  # the style edit, for both methods
    assert result.missing == {"ddim+p2p": [], "null-text-inversion+p2p": ["211000000000"]}


def test_summary_in_paper_units_without_nan_rows(scored):
    result, out = scored
    with open(out / "rows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        for group in ["all", *sorted({r["editing_type_id"] for r in mine})]:
            members = [r for r in mine if group in ("all", r["editing_type_id"])]
            for metric in METRICS:
                mean = result.summary[method][group][metric]
                if metric == "lpips_unedited":
                    assert mean is None
                    continue
                values = [float(r[metric]) for r in members if r[metric] != "nan"]
                assert mean.count == len(values) and mean.nan == len(members) - len(values)
                if values:
                    assert mean.mean == pytest.approx(np.mean(values) * PAPER_SCALE[metric], rel=1e-12)
                else:
                    assert math.isnan(mean.mean)
        overall = result.summary[method]["all"]
        assert overall["psnr_unedited"].nan == 1 and overall["structure_distance"].nan == 0
    assert result.summary["null-text-inversion+p2p"]["all"]["clip_whole"].count == 3
    markdown = (out / "summary.md").read_text()
    assert markdown == result.markdown
    assert "| ddim+p2p | 4 |" in markdown and "| null-text-inversion+p2p | 3 |" in markdown
    assert "9 change style" in markdown and "LPIPS x10^3: n/a, turned off" in markdown
    assert "1 image without an output" in markdown and "211000000000" in markdown
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    grids = {tag for tag in events.Tags()["images"] if tag.startswith("pie_bench_samples/")}
    types = {row["editing_type_id"] for row in result.rows}
    assert len(grids) == len(types) and all(
        any(tag.split("/")[1].startswith(kind + " ") for tag in grids) for kind in types
    )
    # one row per sample shown: its source, then each method's edit (grey where one has none)
    grid = events.Images(sorted(grids)[0])[0]
    assert grid.width > 3 * 128 and grid.height >= 128


def test_edit_panel_is_the_last_square():
    strip = np.arange(4 * 16 * 3, dtype=np.uint8).reshape(4, 16, 3)
    np.testing.assert_array_equal(np.asarray(edit_panel(Image.fromarray(strip))), strip[:, -4:])
    square = Image.fromarray(strip[:, :4])
    assert edit_panel(square) is square
    with pytest.raises(BenchmarkError, match="sample 7"):
        edit_panel(Image.fromarray(strip.transpose(1, 0, 2).copy()), sample="7")


def test_the_command(bench, tmp_path, capsys):
    root, outputs, dino, clip = bench
    main(["--score", str(outputs), "--bench.root", str(root), "--bench.dino", str(dino), "--bench.clip", "none",
          "--bench.lpips", "none", "--bench.device", "cpu", "--bench.methods", "ddim+p2p", "--bench.edit_types", "0,9",
          "--bench.output", str(tmp_path / "b.csv"), "--bench.summary", str(tmp_path / "b.md")])
    printed = capsys.readouterr().out
    assert "| ddim+p2p | 2 |" in printed and "written:" in printed
    rows = list(csv.DictReader(open(tmp_path / "b.csv", newline="")))
    assert [(r["id"], r["clip_whole"]) for r in rows] == [("000000000000", "n/a"), ("900000000000", "n/a")]
    assert "bench" in help_text()


def test_user_mistakes_are_one_error_line(bench, tmp_path, nti_main):
    root, outputs, _, _ = bench
    result = nti_main("bench", "--score", str(outputs), "--bench.root", str(tmp_path), cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("nti: error:")]
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1 and "mapping_file.json" in lines[0], result.stderr


@pytest.mark.parametrize("args, culprit", [
    (["--score", "{tmp}/nope", "--bench.root", "{root}"], "nope"),
    (["--bench.root", "{root}"], "--score"),
    (["--score", "{outputs}", "--bench.root", "{root}", "--bench.methods", "pix2pix"], "pix2pix"),
    (["--score", "{outputs}", "--bench.root", "{root}", "--bench.nonsense", "1"], "--bench.nonsense"),
    (["--score", "{outputs}", "--bench.root", "{root}", "--bench.edit_types", "12"], "editing_type_id in 12"),
    (["--score", "{outputs}", "--bench.root", "{root}", "--bench.device", "tpu-ish"], "bench.device 'tpu-ish'"),
])
def test_user_mistakes_are_nti_errors(bench, tmp_path, args, culprit):
    root, outputs, _, _ = bench
    args = [a.format(tmp=tmp_path, root=root, outputs=outputs) for a in args]
    with pytest.raises(NtiError, match=re.escape(culprit)):
        main(args + ["--bench.dino", "none", "--bench.clip", "none", "--bench.lpips", "none"])


def test_outputs_that_cannot_be_scored_are_failed_rows_and_the_rest_is_scored(bench, tmp_path, capsys):
    root, outputs, _, _ = bench
    damaged = tmp_path / "output"
    shutil.copytree(outputs, damaged)
    folder = damaged / "ddim+p2p" / "annotation_images"
    paths = {key: folder / path for key, (path, *_) in SAMPLES.items()}
    # A truncated write, a stray text file under an image's name, and a strip of another resolution.
    truncated = paths["000000000000"].read_bytes()
    paths["000000000000"].write_bytes(truncated[: len(truncated) // 2])
    paths["111000000000"].write_text("not a picture")
    with Image.open(paths["211000000000"]) as strip:
        strip.resize((strip.width // 2, strip.height // 2)).save(paths["211000000000"])
    reasons = {"000000000000": "cannot read the output", "111000000000": "cannot read the output",
               "211000000000": f"the edit panel is {SIDE // 2}x{SIDE // 2}, the source {SIDE}x{SIDE}"}

    out = tmp_path / "scores"
    result = score_folder(root, damaged, dino="none", clip="none", lpips="none", device="cpu",
                          csv_path=out / "rows.csv", markdown_path=out / "summary.md")
    assert [(row["method"], row["id"]) for row in result.failed] == [("ddim+p2p", key) for key in reasons]
    for row in result.failed:
        assert row["error"].startswith(f"{paths[row['id']]}: ") and reasons[row["id"]] in row["error"], row
    # Everything else is scored: the other method's three outputs and this one's last.
    assert sorted((row["method"], row["id"]) for row in result.rows) == sorted(
        [("ddim+p2p", "900000000000")] + [("null-text-inversion+p2p", key) for key in SAMPLES if key != MISSING[1]])
    psnr = result.summary["ddim+p2p"]["all"]["psnr_unedited"]
    assert psnr.count + psnr.nan == 1  # the means hold the scored rows only

    with open(out / "rows.csv", newline="") as handle:
        rows = {(row["method"], row["id"]): row for row in csv.DictReader(handle)}
    assert len(rows) == 3 + 4
    for key, reason in reasons.items():
        row = rows["ddim+p2p", key]
        assert str(paths[key]) in row["error"] and reason in row["error"]
        assert all(row[metric] == "" for metric in METRICS)  # no value, which is not "nan" (undefined)
    assert rows["ddim+p2p", "900000000000"]["error"] == "" and rows["ddim+p2p", "900000000000"]["mse_unedited"] != ""
    markdown = (out / "summary.md").read_text()
    assert "**3 outputs could not be scored**" in markdown
    tables_end = markdown.index("**3 outputs could not be scored**")
    for key in reasons:
        assert f"- ddim+p2p, sample {key}: {paths[key]}: " in markdown[tables_end:]

    # `nti bench --score`: the summary, then exit status 1 (some failed), as `nti fit` with failed images.
    with pytest.raises(SystemExit) as exited:
        nti_main(["bench", "--score", str(damaged), "--bench.root", str(root), "--bench.dino", "none",
                  "--bench.clip", "none", "--bench.lpips", "none", "--bench.device", "cpu"])
    assert exited.value.code == EXIT_SOME_FAILED
    printed = capsys.readouterr().out
    assert "**3 outputs could not be scored**" in printed and (damaged / "pie_bench.csv").is_file()


def test_an_unreadable_output_is_a_failed_row(bench, tmp_path, monkeypatch):
    root, outputs, _, _ = bench
    damaged = tmp_path / "output"
    shutil.copytree(outputs / "ddim+p2p", damaged)
    locked = damaged / "annotation_images" / SAMPLES["900000000000"][0]
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads every file whatever its mode: refuse it as the system would anyone else
        real_open = Image.open

        def refusing_open(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refusing_open)
    try:
        result = score_folder(root, damaged, dino="none", clip="none", lpips="none", device="cpu")
    finally:
        locked.chmod(0o644)
    [failed] = result.failed
    assert failed["id"] == "900000000000" and failed["error"].startswith(f"{locked}: cannot read the output")
    assert "Permission denied" in failed["error"] and len(result.rows) == 3


def test_a_damaged_mask_names_its_sample(bench, tmp_path):
    root, outputs, _, _ = bench
    damaged = tmp_path / "root"
    shutil.copytree(root, damaged)
    mapping = json.loads((damaged / "mapping_file.json").read_text())
    mapping["111000000000"]["mask"] = [5, 3, 7]
    (damaged / "mapping_file.json").write_text(json.dumps(mapping))
    with pytest.raises(BenchmarkError, match=r"sample '111000000000': mask must be a list of \[start, length\] pairs"):
        score_folder(damaged, outputs, dino="none", clip="none", lpips="none", device="cpu")
