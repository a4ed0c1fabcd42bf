"""`nti bench --config FILE`: PIE-Bench end to end, every method side by side, resumable.

For each method (`null_text`, `negative_prompt`, `ddim`, `direct`) it runs what `nti fit` runs on
the benchmark's mapping file (the inversions, the report), then edits every inverted sample with
the benchmark's settings as `nti predict --data.benchmark` does (specs sampled together), writes
each edit in the authors' output layout (`<output_dir>/<method>/annotation_images/<image_path>`,
a strip whose last panel is the edit) and finally scores every method with the benchmark's
metrics (`score_folder`): `pie_bench.csv`, `pie_bench.md` and TensorBoard under `output_dir`.

Killed anywhere and run again, it redoes nothing finished: `nti fit` skips the inversions on disk,
a sample whose strip exists is not edited again (strips are written atomically), and only the
scoring, which reads the strips, runs again.

The config (YAML), with its defaults:

    root: PIE-Bench_v1               # mapping_file.json and annotation_images/
    demo_samples: 0                  # > 0: first write the offline shapes benchmark of that many samples into root
    methods: [null_text, negative_prompt, ddim, direct]
    output_dir: bench
    batch_size: 8                    # images inverted together, and edit specs sampled together
    model: {pretrained: CompVis/stable-diffusion-v1-4}   # any model.* option of nti fit (T, w, N, ...)
    trainer: {}                      # trainer.* options of nti fit and nti predict (accelerator, precision, ...)
    edit: {}                         # overrides of the benchmark's edit settings (bench.pie.BENCHMARK_OPTIONS)
    score: {dino: facebook/dino-vitb8, clip: openai/clip-vit-large-patch14, lpips: squeeze, device: null}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml
from PIL import Image

from nti_lightning.bench.pie import benchmark_edit, read_mapping
from nti_lightning.bench.score import IMAGES, MAPPING_FILE, BenchScores, score_folder
from nti_lightning.bench.shapes_set import write_shapes_bench
from nti_lightning.bench.weights import CLIP_DEFAULT, DINO_DEFAULT, LPIPS_DEFAULT
from nti_lightning.errors import InputNotFoundError, OptionError
from nti_lightning.inversion.atomic import atomic_path, atomic_text

#: The methods of the published table, in its order.
METHODS = ("ddim", "null_text", "negative_prompt", "direct")


@dataclass
class BenchConfig:
    """What `nti bench --config` runs (see the module's documentation for each key)."""

    root: str = "PIE-Bench_v1"
    demo_samples: int = 0
    methods: list[str] = field(default_factory=lambda: ["null_text", "negative_prompt", "ddim", "direct"])
    output_dir: str = "bench"
    batch_size: int = 8
    model: dict[str, Any] = field(default_factory=lambda: {"pretrained": "CompVis/stable-diffusion-v1-4"})
    trainer: dict[str, Any] = field(default_factory=dict)
    edit: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=lambda: {"dino": DINO_DEFAULT, "clip": CLIP_DEFAULT, "lpips": LPIPS_DEFAULT})

    @classmethod
    def load(cls, path: str | Path) -> "BenchConfig":
        """Reads a YAML config; `OptionError` naming the file and the key for a mistake."""
        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError(f"{path}: bench config not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise OptionError(f"{path}: not YAML ({error})") from error
        if not isinstance(raw, dict):
            raise OptionError(f"{path}: a bench config is a mapping of keys, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise OptionError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
        config = cls(**raw)
        bad = [m for m in config.methods if m not in METHODS]
        if bad or not config.methods:
            raise OptionError(f"{path}: methods {bad or '[]'} not among {list(METHODS)}")
        for key in ("model", "trainer", "edit", "score"):
            if not isinstance(getattr(config, key), dict):
                raise OptionError(f"{path}: '{key}' must be a mapping")
        if "method" in config.model or "output_dir" in config.model:
            raise OptionError(f"{path}: model.method and model.output_dir are set by nti bench (methods, output_dir)")
        return config


def run_bench(config: BenchConfig) -> BenchScores:
    """Inverts, edits and scores the benchmark for every method of `config`; returns the scores."""
    root, out = Path(config.root), Path(config.output_dir)
    mapping = root / MAPPING_FILE
    if config.demo_samples > 0 and not mapping.is_file():
        write_shapes_bench(root, config.demo_samples)
        print(f"nti bench: wrote the offline shapes benchmark ({config.demo_samples} samples) to {root}", flush=True)
    if not mapping.is_file():
        raise InputNotFoundError(f"{mapping}: no PIE-Bench mapping file (root must hold {MAPPING_FILE} and {IMAGES}/)")
    samples, _ = read_mapping(mapping)
    for method in config.methods:
        inversions = out / method / "inversions"
        print(f"nti bench: {method}: inverting", flush=True)
        _nti(["fit", *_flags("model", {**config.model, "method": method, "output_dir": str(inversions)}),
              "--data.manifest", str(mapping), "--data.batch_size", str(config.batch_size),
              *_flags("trainer", {"logger": False, **config.trainer})])
        strips = out / method / IMAGES
        pending = [s for s in samples if (inversions / f"{s.id}.safetensors").is_file() and not (strips / s.image_path).is_file()]
        if pending:
            print(f"nti bench: {method}: editing {len(pending)} sample(s)", flush=True)
            edits = out / method / "edits"
            specs = out / method / "edits.jsonl"
            with atomic_text(specs) as handle:
                for sample in pending:
                    handle.write(json.dumps(benchmark_edit(sample, inversions / f"{sample.id}.safetensors", config.edit)) + "\n")
            model = {k: v for k, v in config.model.items() if k in ("pretrained", "guidance_scale", "allow_model_mismatch")}
            _nti(["predict", *_flags("model", {**model, "attention_maps": False}), "--data.edits_file", str(specs),
                  "--data.batch_size", str(config.batch_size), "--writer.output_dir", str(edits),
                  "--writer.log_images", "false", *_flags("trainer", {"logger": False, **config.trainer})])
            for sample in pending:
                edited = edits / f"{sample.id}_edit1.png"
                if edited.is_file():
                    write_strip(sample.image, edited, strips / sample.image_path)
    print("nti bench: scoring", flush=True)
    present = [m for m in config.methods if (out / m / IMAGES).is_dir()]
    if not present:
        raise OptionError(f"{out}: no method produced an edit; see the failures.jsonl files under it")
    score = {"dino": DINO_DEFAULT, "clip": CLIP_DEFAULT, "lpips": LPIPS_DEFAULT, **config.score}
    scores = score_folder(root, out, present, dino=score["dino"], clip=score["clip"], lpips=score["lpips"],
                          device=score.get("device"), csv_path=out / "pie_bench.csv", markdown_path=out / "pie_bench.md",
                          tensorboard_dir=out / "runs" / "bench")
    print(scores.markdown)
    print("written: " + ", ".join(str(path) for path in scores.written), flush=True)
    return scores


def write_strip(source: Path, edited: Path, target: Path) -> Path:
    """`target`: the source image and the edit side by side, the edit last as the authors' scripts
    lay it out (resized to the source's size when the model works at another resolution)."""
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    with Image.open(edited) as opened:
        edit = opened.convert("RGB")
    if edit.size != image.size:
        edit = edit.resize(image.size, Image.Resampling.BICUBIC)
    strip = Image.new("RGB", (image.width * 2, image.height))
    strip.paste(image, (0, 0))
    strip.paste(edit, (image.width, 0))
    with atomic_path(target) as temporary:
        strip.save(temporary, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"), quality=95)
    return target


def _flags(group: str, values: dict[str, Any]) -> list[str]:
    """`--group.key value` words for LightningCLI (YAML values as JSON)."""
    words = []
    for key, value in values.items():
        words += [f"--{group}.{key}", value if isinstance(value, str) else json.dumps(value)]
    return words


@contextlib.contextmanager
def _own_argv() -> Iterator[None]:
    """LightningCLI reads sys.argv beside the words it is given: hand it none."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _nti(words: list[str]) -> None:
    """Runs `nti <words>` in this process; a run in which some images or edits failed goes on
    (they are in its failures.jsonl and the bench leaves them out)."""
    from nti_lightning.cli import EXIT_SOME_FAILED, main

    with _own_argv():
        try:
            main(words)
        except SystemExit as exit_:
            if exit_.code not in (0, None, EXIT_SOME_FAILED):
                raise


def main(args: Optional[Sequence[str]] = None) -> BenchScores:
    """`nti bench --config FILE [--root DIR] [--output_dir DIR]`."""
    parser = argparse.ArgumentParser(prog="nti bench", description="PIE-Bench end to end: invert, edit and score.")
    parser.add_argument("--config", required=True, help="the bench's YAML config (see nti_lightning/bench/run.py)")
    parser.add_argument("--root", help="overrides the config's root")
    parser.add_argument("--output_dir", help="overrides the config's output_dir")
    try:
        options = parser.parse_args(list(args) if args is not None else None)
    except SystemExit as exit_:
        if exit_.code:
            raise OptionError("nti bench: --config FILE is required (or --score DIR to score a folder)") from None
        raise
    config = BenchConfig.load(options.config)
    config.root = options.root or config.root
    config.output_dir = options.output_dir or config.output_dir
    return run_bench(config)
