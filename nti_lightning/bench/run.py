"""`nti bench --config FILE`: PIE-Bench end to end, every method side by side, resumable.

For each method (`null_text`, `negative_prompt`, `ddim`, `direct`, `ddpm`, `proxnpi`, `edict`, `pix2pix_zero`) it
runs what `nti fit` runs on the benchmark's mapping file (the inversions, the report), then edits
every inverted sample with the benchmark's settings as `nti predict --data.benchmark` does (specs
sampled together), writes each edit in the authors' output layout
(`<output_dir>/<method>/annotation_images/<image_path>`, a strip whose last panel is the edit)
and finally scores every method with the benchmark's metrics (`score_folder`): `pie_bench.csv`,
`pie_bench.md` and TensorBoard under `output_dir`. EDICT edits with the prompts alone, as its
authors' code does; the others under the benchmark's Prompt-to-Prompt settings. The other editors
of `editors` (MasaCtrl, Plug-and-Play, Pix2Pix-Zero) edit the inversions of the methods of
`editor_methods` with their scripts' settings, as rows `<method>+<editor>` of the same table
(MasaCtrl's benchmark inverts with the source prompt "": those inversions go under
`<output_dir>/<method>+masactrl/inversions`; Pix2Pix-Zero's DDIM and Direct rows edit its own
regularised DDIM inversion, made once under `<output_dir>/pix2pix_zero/inversions`).

Killed anywhere and run again, it redoes nothing finished: `nti fit` skips the inversions on disk,
a sample whose strip exists is not edited again (strips are written atomically), and only the
scoring, which reads the strips, runs again.

Every method but edit-friendly DDPM and EDICT (which make their own trajectories) starts from the same
DDIM pivot of each image (w = 1, the source prompt): the first method computes it and stores it
under `output_dir/pivots`, the others read it. On several
devices (`trainer.devices`) each stage runs as a child `nti` process, which Lightning starts once
per device as for `nti fit`. Each stage prints a timestamped line with its count, time and
rate, and appends them to `output_dir/bench_timings.jsonl`.

Its options (`nti_lightning.bench.options`): a YAML config (`--config`), the command line, or both,
as for `nti fit`; `nti bench --help` lists every key with its type, default and help:

    root: PIE-Bench_v1               # mapping_file.json and annotation_images/
    demo_samples: 0                  # > 0: first write the offline shapes benchmark of that many samples into root
    demo_resolution: 32              # its image side (512: PIE-Bench's size, for timing an SD 1.x model)
    methods: [null_text, negative_prompt, ddim, direct, ddpm, proxnpi, edict, pix2pix_zero]
    editors: [p2p]                   # and masactrl, pnp, p2p_zero: rows <method>+<editor>
    editor_methods: [ddim, direct]   # the methods the editors other than p2p edit
    output_dir: bench
    batch_size: 8                    # images inverted together, and edit specs sampled together
    model: {pretrained: CompVis/stable-diffusion-v1-4}   # any model.* option of nti fit (T, w, N, ...); the edits take
                                     # its pretrained, guidance_scale, allow_model_mismatch and channels_last
    trainer: {}                      # trainer.* options of nti fit and nti predict (accelerator, precision, ...)
    edit: {}                         # overrides of the benchmark's edit settings (editing.pie_bench.BENCHMARK_OPTIONS)
    score: {dino: facebook/dino-vitb8, clip: openai/clip-vit-large-patch14, lpips: squeeze, device: null}
    share_pivots: true               # compute each image's DDIM pivot once, for every method (output_dir/pivots)
    vae_round_trip: true             # also score the VAE round trip of each source (the row vae_round_trip)

`--model.num_inner_steps 5` overrides the YAML's `model: {num_inner_steps: ...}`. Every value is
checked before the benchmark's files are read, and all the mistakes of a config are reported
together. `nti bench --score DIR --bench.root ROOT` scores a folder instead (`score.main`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from PIL import Image

from nti_lightning.bench.options import (
    METHODS,
    BenchConfig,
    is_score_mode,
    parse_run_args,
)
from nti_lightning.bench.score import IMAGES, MAPPING_FILE, BenchScores, score_folder
from nti_lightning.bench.score import main as score_main
from nti_lightning.bench.shapes_set import write_shapes_bench
from nti_lightning.bench.weights import CLIP_DEFAULT, DINO_DEFAULT, LPIPS_DEFAULT
from nti_lightning.data.pie_bench import BenchSample, read_mapping
from nti_lightning.editing.editors import EDITOR_SETTINGS, P2P
from nti_lightning.editing.pie_bench import benchmark_edit
from nti_lightning.errors import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    InputNotFoundError,
    OptionError,
)
from nti_lightning.storage.atomic import atomic_path, atomic_text
from nti_lightning.training.progress import duration

__all__ = ["METHODS", "PIVOTS", "TIMINGS", "VAE_ROUND_TRIP", "BenchConfig", "main", "row_name", "run_bench",
           "write_strip"]

#: The row of the VAE round trip (the source decoded from its own latent): what an edit that kept
#: the source latent would score on the unedited region, the reference the methods are read against.
VAE_ROUND_TRIP = "vae_round_trip"

#: Under `output_dir`: the DDIM pivots the methods share, and the stages' times.
PIVOTS = "pivots"
TIMINGS = "bench_timings.jsonl"


def run_bench(config: BenchConfig) -> BenchScores:
    """Inverts, edits and scores the benchmark for every method of `config`; returns the scores.

    Args:
        config (`BenchConfig`): the run; checked first (`BenchConfig.checked`), before any file is read.

    Raises:
        `OptionError`: every mistake in `config`, in one message; `InputNotFoundError`: `root`
        holds no mapping file (and `demo_samples` is 0).
    """
    config = config.checked()
    root, out = Path(config.root), Path(config.output_dir)
    mapping = root / MAPPING_FILE
    if config.demo_samples > 0 and not mapping.is_file():
        write_shapes_bench(root, config.demo_samples, resolution=config.demo_resolution)
        _say(
            f"wrote the offline shapes benchmark ({config.demo_samples} samples, {config.demo_resolution} px) to {root}"
        )
    if not mapping.is_file():
        raise InputNotFoundError(f"{mapping}: no PIE-Bench mapping file (root must hold {MAPPING_FILE} and {IMAGES}/)")
    samples, _ = read_mapping(mapping)
    stage = _stage_runner(config.trainer)
    for method in config.methods:
        _invert(config, stage, mapping, samples, method)
        for editor in _editors_of(config, method):
            row, inversions = row_name(method, editor), out / method / "inversions"
            if editor != P2P:  # the inversions its benchmark script edits
                settings = EDITOR_SETTINGS[editor]
                inverted = settings.benchmark_inversion(method)
                if settings.benchmark_source_prompt is not None:  # inverted with another prompt (MasaCtrl's "")
                    inversions = _invert_with_prompt(config, stage, samples, inverted, row,
                                                     settings.benchmark_source_prompt)
                elif inverted != method:  # another method's, made once under its own name (Pix2Pix-Zero's)
                    inversions = _invert(config, stage, mapping, samples, inverted)
            _edit(config, stage, samples, row, inversions, editor, method)
    _say("scoring")
    started = time.monotonic()
    rows = [row_name(m, e) for m in config.methods for e in _editors_of(config, m)]
    present = [row for row in rows if (out / row / IMAGES).is_dir()]
    if not present:
        raise OptionError(f"{out}: no method produced an edit; see the failures.jsonl files under it")
    if config.vae_round_trip and (out / VAE_ROUND_TRIP / IMAGES).is_dir():
        present.append(VAE_ROUND_TRIP)
    score = {"dino": DINO_DEFAULT, "clip": CLIP_DEFAULT, "lpips": LPIPS_DEFAULT, **config.score}
    scores = score_folder(
        root,
        out,
        present,
        dino=score["dino"],
        clip=score["clip"],
        lpips=score["lpips"],
        device=score.get("device"),
        csv_path=out / "pie_bench.csv",
        markdown_path=out / "pie_bench.md",
        tensorboard_dir=out / "runs" / "bench",
    )
    _record(out / TIMINGS, "all", "score", time.monotonic() - started, len(scores.rows))
    print(scores.markdown)
    print("written: " + ", ".join(str(path) for path in scores.written), flush=True)
    return scores


def _editors_of(config: BenchConfig, method: str) -> list[str]:
    """The editors of `method`'s rows: p2p for every method, the others for `editor_methods`."""
    return [editor for editor in config.editors if editor == P2P or method in config.editor_methods]


def row_name(method: str, editor: str) -> str:
    """The table's row (and output folder) of a method's inversions edited by an editor: the
    method's name for Prompt-to-Prompt, `<method>+<editor>` for the others (`direct+masactrl`).

    Args:
        method (`str`): the inversion method.
        editor (`str`): the editor.
    """
    return method if editor == P2P else f"{method}+{editor}"


def _invert(config: BenchConfig, stage: Callable[[list[str]], None], mapping: Path, samples: list[BenchSample],
            method: str, row: Optional[str] = None) -> Path:
    """`nti fit` of one method on `mapping` (the mapping file, or a manifest of the same samples)
    into `<row>/inversions` (what is on disk is skipped); returns that folder."""
    out = Path(config.output_dir)
    row = row or method
    inversions = out / row / "inversions"
    todo = sum(not (inversions / f"{s.id}.safetensors").is_file() for s in samples)
    if not todo:  # made by an earlier run, or for another row of this one
        return inversions
    _say(f"{row}: inverting {todo} of {len(samples)} sample(s)")
    started = time.monotonic()
    # The ddim row is the DDIM baseline: the other methods' reports need not sample it again.
    model = {"ddim_baseline": False, **config.model, "method": method, "output_dir": str(inversions)}
    if config.share_pivots and row == method:  # pivots of the samples' source prompts
        model["pivot_dir"] = str(out / PIVOTS)
    stage(["fit", *_flags("model", model), "--data.manifest", str(mapping), "--data.batch_size", str(config.batch_size),
           *_flags("trainer", {"logger": False, **config.trainer})])
    done = sum((inversions / f"{s.id}.safetensors").is_file() for s in samples) - (len(samples) - todo)
    _record(out / TIMINGS, row, "invert", time.monotonic() - started, done)
    return inversions


def _invert_with_prompt(config: BenchConfig, stage: Callable[[list[str]], None], samples: list[BenchSample],
                        method: str, row: str, prompt: str) -> Path:
    """The samples inverted by `method` with the source prompt `prompt` (MasaCtrl's benchmark rows:
    ""), from a manifest of them under `<row>/`; returns the inversions' folder."""
    manifest = Path(config.output_dir) / row / "manifest.jsonl"
    with atomic_text(manifest) as handle:
        for sample in samples:
            handle.write(json.dumps({"image": str(Path(sample.image).resolve()), "prompt": prompt,
                                     "id": sample.id}) + "\n")
    return _invert(config, stage, manifest, samples, method, row)


def _edit(config: BenchConfig, stage: Callable[[list[str]], None], samples: list[BenchSample], row: str,
          inversions: Path, editor: str = P2P, method: Optional[str] = None) -> None:
    """`nti predict` of the benchmark's edits (by `editor`) of the inverted samples in `inversions`
    that have no strip yet in `row`, then their strips (and the VAE round trip's) in the authors' layout."""
    out = Path(config.output_dir)
    strips = out / row / IMAGES
    pending = [
        s for s in samples if (inversions / f"{s.id}.safetensors").is_file() and not (strips / s.image_path).is_file()
    ]
    if not pending:
        return
    _say(f"{row}: editing {len(pending)} sample(s)")
    started = time.monotonic()
    edits, specs = out / row / "edits", out / row / "edits.jsonl"
    with atomic_text(specs) as handle:
        for sample in pending:
            handle.write(
                json.dumps(
                    benchmark_edit(sample, inversions / f"{sample.id}.safetensors", config.edit, editor, method)
                ) + "\n"
            )
    model = {
        k: v
        for k, v in config.model.items()
        if k in ("pretrained", "guidance_scale", "allow_model_mismatch", "channels_last")
    }
    vae_strips = out / VAE_ROUND_TRIP / IMAGES
    inputs = config.vae_round_trip and any(not (vae_strips / s.image_path).is_file() for s in pending)
    stage(["predict", *_flags("model", {**model, "attention_maps": False, "reconstruction": False}),
           "--data.edits_file", str(specs), "--data.batch_size", str(config.batch_size),
           "--writer.output_dir", str(edits), "--writer.log_images", "false",
           "--writer.save_inputs", json.dumps(inputs),  # the VAE round trip, until its row is complete
           *_flags("trainer", {"logger": False, "enable_progress_bar": False, **config.trainer})])
    edited = 0
    for sample in pending:
        if (edits / f"{sample.id}_edit1.png").is_file():
            write_strip(sample.image, edits / f"{sample.id}_edit1.png", strips / sample.image_path)
            edited += 1
        if inputs and (edits / f"{sample.id}_input.png").is_file() and not (vae_strips / sample.image_path).is_file():
            write_strip(sample.image, edits / f"{sample.id}_input.png", vae_strips / sample.image_path)
    _record(out / TIMINGS, row, "edit", time.monotonic() - started, edited)


def _say(message: str) -> None:
    """One timestamped line on standard output (a batch job's log reads as it goes)."""
    print(f"nti bench [{time.strftime('%H:%M:%S')}]: {message}", flush=True)


def _record(path: Path, method: str, stage: str, seconds: float, items: int) -> None:
    """Prints a stage's time and rate and appends it to `path` (one JSON line per stage and run)."""
    rate = f", {items / seconds * 3600:.0f}/hour" if items and seconds >= 1 else ""
    _say(f"{method}: {stage}: {items} in {duration(seconds)}{rate}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": method, "stage": stage,
                                 "seconds": round(seconds, 3), "items": items}) + "\n")


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


def _stage_runner(trainer: dict[str, Any]) -> Callable[[list[str]], None]:
    """How a stage (`nti fit`, `nti predict`) runs: in this process when the trainer runs one
    process, else as a child `nti` process, which Lightning's launcher can start once per device
    as it does for `nti fit` on the command line."""
    return _in_process if _one_process(trainer) else _child_process


def _one_process(trainer: dict[str, Any]) -> bool:
    """Whether `trainer` options run Lightning in a single process."""
    if str(trainer.get("num_nodes", 1)) != "1":
        return False
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        return len(devices) == 1
    if str(devices) == "1":
        return True
    if str(devices) in ("auto", "-1"):
        import torch

        return str(trainer.get("accelerator", "auto")) == "cpu" or torch.cuda.device_count() <= 1
    return False


def _in_process(words: list[str]) -> None:
    """Runs `nti <words>` (`fit` or `predict`) in this process; a run in which some images or
    edits failed goes on (they are in its failures.jsonl and the bench leaves them out). A usage
    error or an interrupt propagates to `nti`'s own handling (exit 2, 130 or 143)."""
    from nti_lightning.editing.cli import main as predict_cli
    from nti_lightning.training.cli import fit_cli

    run = {"fit": fit_cli, "predict": predict_cli}[words[0]]
    with _own_argv():
        run(words)


def _child_process(words: list[str]) -> None:
    """Runs `python -m nti_lightning <words>` (its output goes to this process's). A usage error
    stops the bench and an interrupt is passed on; a child that dies otherwise (a crash while the
    processes of several devices tear down) leaves what it wrote, which the bench goes on with:
    what is missing is redone by the next run and meanwhile scored as missing."""
    status = subprocess.call([sys.executable, "-m", "nti_lightning", *words])
    if status == EXIT_USAGE:
        raise OptionError(f"nti bench: `nti {words[0]}` stopped on a usage error (its message is above)")
    if status in (EXIT_SIGINT, -signal.SIGINT):
        raise SystemExit(EXIT_SIGINT)
    if status in (EXIT_SIGTERM, -signal.SIGTERM):
        raise SystemExit(EXIT_SIGTERM)
    if status not in (0, EXIT_SOME_FAILED):
        _say(f"`nti {words[0]}` ended with status {status}; going on with what it wrote (rerun to redo the rest)")


def main(args: Optional[Sequence[str]] = None) -> BenchScores:
    """`nti bench`: `--config FILE [--KEY VALUE ...]` runs the benchmark, `--score DIR --bench.root
    ROOT [--bench.KEY VALUE ...]` scores a folder (`score.main`).

    Args:
        args (`Sequence[str]`, *optional*): the words after `nti bench`; the command line's by default.

    Returns:
        `BenchScores`: the scores written.

    Raises:
        `OptionError`: a usage mistake, or every mistake of the config (one message), raised
        before any file but the config files is read.
    """
    args = list(sys.argv[1:] if args is None else args)
    if is_score_mode(args):
        return score_main(args)
    return run_bench(parse_run_args(args))
