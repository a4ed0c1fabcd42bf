"""`nti bench`'s options: what a run reads (`BenchConfig`) and what scoring a folder reads, parsed
with jsonargparse as `nti fit` and `nti predict` are, and every value checked before any file of
the benchmark is read.

There are two ways to call it (`nti bench --help` shows both and every key):

    nti bench --config FILE [--KEY VALUE ...]                runs the benchmark end to end
    nti bench --score DIR --bench.root ROOT [--bench.KEY ...]  scores a folder of outputs

A run's keys come from the YAML config (`--config`), the command line (`--model.num_inner_steps 5`
overrides the YAML's `model: {num_inner_steps: ...}`), or both; those of `model.*` are
`NullTextInversion`'s (`nti fit`'s), those of `trainer.*` the Trainer's. The config as a whole is
checked before the run starts, and every mistake in it (a wrong type, a value out of range, an
unknown method or key) is reported together in one `OptionError`, each named by its key.

Why two parsers for a run: jsonargparse stops at the first value of the wrong type, so the words
and the YAML are first read by a copy of the parser that takes any value (`_lenient_parser`),
then each value is checked on its own against the typed parser (`_typed_parser`), which also
prints `--help`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import typing
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
)

from nti_lightning.bench.weights import CLIP_DEFAULT, DINO_DEFAULT, LPIPS_DEFAULT
from nti_lightning.editing.editors import EDITOR_SETTINGS, EDITORS, P2P
from nti_lightning.editing.pie_bench import BENCHMARK_OPTIONS
from nti_lightning.errors import InputNotFoundError, OptionError
from nti_lightning.inversion.methods import METHODS as INVERSION_METHODS
from nti_lightning.inversion.methods import REGISTRY as INVERSION_REGISTRY

#: The methods a run can compare: every registered inversion method (`nti_lightning.inversion.methods`).
METHODS = INVERSION_METHODS

#: The model a run inverts and edits with unless `model.pretrained` says otherwise (the benchmark's).
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

#: `model.*` options that `nti bench` sets itself, from `methods` and `output_dir`.
SET_BY_BENCH = ("method", "output_dir")

#: Smallest `demo_resolution`: a latent diffusion model's VAE divides the image side by 8.
MIN_DEMO_RESOLUTION = 8

#: The two ways to call `nti bench`, named in every usage error.
TWO_WAYS = ("`nti bench --config FILE` runs the benchmark, `nti bench --score DIR --bench.root ROOT` scores a "
            "folder; `nti bench --help` lists the options")

USAGE = """nti bench --config FILE [--KEY VALUE ...]
       nti bench --score DIR --bench.root ROOT [--bench.KEY VALUE ...]"""

DESCRIPTION = """PIE-Bench, two ways:
  nti bench --config FILE [--KEY VALUE ...]       invert, edit and score every method (the keys below; a YAML
                                                  config, the command line, or both)
  nti bench --score DIR --bench.root ROOT [...]   score a folder of outputs in the authors' layout (the last
                                                  group below)"""

#: The groups of a run's config, each a YAML mapping and `--GROUP.KEY` options.
GROUPS = ("model", "trainer", "edit", "score")


@dataclass
class BenchConfig:
    """A run of the benchmark: `nti bench --config FILE` (see nti_lightning/bench/run.py).

    Args:
        root (`str`, defaults to "PIE-Bench_v1"): the benchmark folder: mapping_file.json and annotation_images/.
        demo_samples (`int`, defaults to 0): when above 0, first write the offline shapes benchmark of that many
            samples into root (if root holds none).
        demo_resolution (`int`, defaults to 32): the shapes benchmark's image side (512: PIE-Bench's size, to time
            an SD 1.x model).
        methods (`list[str]`, defaults to every one): the methods to run, any of
            `nti_lightning.inversion.methods.METHODS` (null_text, negative_prompt, ddim, direct, ddpm, proxnpi,
            edict, pix2pix_zero), each with its benchmark settings (its defaults).
        editors (`list[str]`, defaults to ["p2p"]): the editors, any of p2p, masactrl, pnp, p2p_zero: p2p edits
            every method's inversions (rows named by the method), each other one those of `editor_methods`
            (rows `<method>+<editor>`), with its benchmark script's settings.
        editor_methods (`list[str]`, defaults to ["ddim", "direct"]): the methods the editors other than p2p edit
            (the benchmark's Table 1 pairs them with DDIM and Direct Inversion); each must be in `methods`.
        output_dir (`str`, defaults to "bench"): where the inversions, the edits and the scores go.
        batch_size (`int`, defaults to 8): images inverted together, and edit specs sampled together.
        model (`dict`, defaults to {"pretrained": "CompVis/stable-diffusion-v1-4"}): `model.*` options of nti fit
            (T, w, N, ...); the edits take its pretrained, guidance_scale, allow_model_mismatch and channels_last.
        trainer (`dict`, defaults to {}): `trainer.*` options of nti fit and nti predict (accelerator, ...).
        edit (`dict`, defaults to {}): overrides of the benchmark's edit settings (`EditSettings`).
        score (`dict`, defaults to the evaluator's networks): where the scoring networks are (`ScoreSettings`).
        share_pivots (`bool`, defaults to True): compute each image's DDIM pivot once, for every method
            (output_dir/pivots).
        vae_round_trip (`bool`, defaults to True): also score the VAE round trip of each source (the row
            vae_round_trip).
    """

    root: str = "PIE-Bench_v1"
    demo_samples: int = 0
    demo_resolution: int = 32
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    editors: list[str] = field(default_factory=lambda: [P2P])
    editor_methods: list[str] = field(default_factory=lambda: ["ddim", "direct"])
    output_dir: str = "bench"
    batch_size: int = 8
    model: dict[str, Any] = field(default_factory=lambda: {"pretrained": DEFAULT_MODEL})
    trainer: dict[str, Any] = field(default_factory=dict)
    edit: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(
        default_factory=lambda: {"dino": DINO_DEFAULT, "clip": CLIP_DEFAULT, "lpips": LPIPS_DEFAULT})
    share_pivots: bool = True
    vae_round_trip: bool = True

    @classmethod
    def load(cls, path: str | Path) -> "BenchConfig":
        """Reads and checks a YAML config (as `nti bench --config path`).

        Args:
            path (`str` or `Path`): the config file.

        Raises:
            `InputNotFoundError`: no such file; `OptionError`: every mistake in it, in one message.
        """
        return parse_run_args(["--config", str(path)])

    def checked(self) -> "BenchConfig":
        """This config with every value checked as a config file's are (types, ranges, names, keys),
        its `model.pretrained` and `score` networks filled in with their defaults.

        Raises:
            `OptionError`: every mistake, in one message.
        """
        given = {key: value for key, value in asdict(self).items() if key not in GROUPS}
        for group in GROUPS:
            value = getattr(self, group)
            if isinstance(value, dict):
                given.update({f"{group}.{key}": item for key, item in value.items()})
            else:
                given[group] = value  # reported: a group is a mapping
        return _checked(given)


@dataclass
class EditSettings:
    """edit: the benchmark's edit settings (run_editing_p2p.py), each overridable.

    Args:
        cross_replace_steps (`float`, `list[float]` or `dict[str, float]`, defaults to 0.4): share of the steps
            with cross-attention replaced: a fraction, [start, end], or per word with a "default_" key.
        self_replace_steps (`float` or `list[float]`, defaults to 0.6): share of the steps with self-attention
            replaced: a fraction or [start, end].
        reweight (`float`, defaults to 2.0): the factor of the target blend word's attention.
        blend_threshold (`float`, defaults to 0.3): LocalBlend's threshold on the blend words' attention.
        blend_start (`float`, defaults to 0.2): share of the steps before LocalBlend starts.
    """

    cross_replace_steps: Union[float, list[float], dict[str, float]] = BENCHMARK_OPTIONS["cross_replace_steps"]
    self_replace_steps: Union[float, list[float]] = BENCHMARK_OPTIONS["self_replace_steps"]
    reweight: float = BENCHMARK_OPTIONS["reweight"]
    blend_threshold: float = BENCHMARK_OPTIONS["blend_threshold"]
    blend_start: float = BENCHMARK_OPTIONS["blend_start"]


@dataclass
class ScoreSettings:
    """score: the networks of the benchmark's metrics (loaded from local files or the cache only).

    Args:
        dino (`str`, *optional*, defaults to "facebook/dino-vitb8"): DINO ViT-B/8's folder or cached hub id;
            none: the structure distance off.
        clip (`str`, *optional*, defaults to "openai/clip-vit-large-patch14"): CLIP ViT-L/14's folder or cached
            hub id; none: the CLIP similarities off.
        lpips (`str`, *optional*, defaults to "squeeze"): squeeze (the torch hub cache) or a torch hub folder;
            none: LPIPS off.
        device (`str`, *optional*): where the networks run: cpu, cuda, cuda:1 (default: cuda when there is a GPU).
    """

    # A YAML `off` or `false` reads as a boolean, which turns a network off as "none" does.
    dino: Optional[Union[str, bool]] = DINO_DEFAULT
    clip: Optional[Union[str, bool]] = CLIP_DEFAULT
    lpips: Optional[Union[str, bool]] = LPIPS_DEFAULT
    device: Optional[str] = None


def usage_error(message: str) -> OptionError:
    """The `OptionError` of a mistake on `nti bench`'s command line, naming the two ways to call it.

    Args:
        message (`str`): what is wrong.
    """
    return OptionError(f"nti bench: {_one_line(message)} ({TWO_WAYS})")


def is_score_mode(args: Sequence[str]) -> bool:
    """Whether `args` (the words after `nti bench`) score a folder (`--score DIR`) rather than run.

    Args:
        args (`Sequence[str]`): the words.
    """
    return any(word == "--score" or word.startswith("--score=") for word in args)


def wants_help(args: Sequence[str]) -> bool:
    """Whether `args` ask for `nti bench --help`.

    Args:
        args (`Sequence[str]`): the words after `nti bench`.
    """
    return any(word in ("-h", "--help") for word in args)


def print_help() -> None:
    """Prints `nti bench --help`: both ways to call it and every key, with its type, default and help."""
    _help_parser().print_help()


# ----------------------------------------------------------------------------- a run's config


def parse_run_args(args: Sequence[str]) -> BenchConfig:
    """The checked config of `nti bench --config FILE [--KEY VALUE ...]`.

    Only the config files are read. `--help` (and `--GROUP.KEY.help CLASS` of a class-typed
    trainer option) prints and exits as argparse does; `--print_config` prints the checked config
    as YAML and exits.

    Args:
        args (`Sequence[str]`): the words after `nti bench`.

    Raises:
        `InputNotFoundError`: a config file that does not exist; `OptionError`: the words do not
        parse, or the config has mistakes (all of them in one message).
    """
    args = list(args)
    if wants_help(args):
        print_help()
        raise SystemExit(0)
    if not args:
        raise usage_error("nothing to do")
    scoring = sorted({word.split("=")[0] for word in args if word.startswith("--bench.")})
    if scoring:
        are = "is an option" if len(scoring) == 1 else "are options"
        raise usage_error(f"{', '.join(scoring)} {are} of scoring a folder: add --score DIR")
    if any(word.startswith("--") and word.split("=")[0].endswith(".help") for word in args):
        _parse(_typed_parser(), args)  # prints the class's options and exits
    empty = [path for path in _config_paths(args) if _check_config_file(Path(path))]
    # an empty file is an empty config, which jsonargparse refuses to read: give it as one
    args = ["{}" if word in empty and before == "--config" else word for before, word in zip(["", *args], args)]
    args = ["--config={}" if word.startswith("--config=") and word.split("=", 1)[1] in empty else word for word in args]
    given = _parse(_lenient_parser(), args)
    show = bool(given.get("print_config"))
    values = {key: value for key, value in _leaves(given).items() if key not in ("config", "print_config")}
    config = _checked(values)
    if show:
        import yaml

        print(yaml.safe_dump(asdict(config), sort_keys=False), end="")
        raise SystemExit(0)
    return config


def _config_paths(args: list[str]) -> list[str]:
    """The files of `--config FILE` / `--config=FILE` in `args` (a YAML string given instead is
    left to jsonargparse)."""
    paths = [value for word, value in zip(args, args[1:]) if word == "--config"]
    paths += [word.split("=", 1)[1] for word in args if word.startswith("--config=")]
    return [path for path in paths if not path.lstrip().startswith("{") and "\n" not in path]


def _check_config_file(path: Path) -> bool:
    """Whether the config file `path` is empty; `InputNotFoundError` or `OptionError` naming it when
    it is no YAML mapping (jsonargparse's own messages do not name the file)."""
    import yaml

    if not path.is_file():
        raise InputNotFoundError(f"{path}: bench config not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise OptionError(f"{path}: not YAML ({_one_line(str(error))})") from None
    if not isinstance(raw, (dict, type(None))):
        raise OptionError(f"{path}: a bench config is a mapping of keys, got {type(raw).__name__}")
    return raw is None


def _parse(parser: ArgumentParser, args: list[str]) -> Namespace:
    """`parser`'s namespace of `args`: only what they and the config files give (no defaults), no
    check but the parse itself; a mistake is `usage_error`."""
    try:
        # _skip_validation: the typed checks run key by key afterwards, so that all are reported.
        return parser.parse_args(args, defaults=False, _skip_validation=True)
    except argparse.ArgumentError as error:
        raise usage_error(str(error)) from None


def _leaves(given: Namespace) -> dict[str, Any]:
    """`given` as {dotted key: value}: a key of the parser keeps its value whole (a trainer.logger
    mapping is one value), a group or an unknown mapping is walked into."""
    known = set(_known_keys())
    leaves: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        children = list(value.keys(branches=True, nested=False)) if isinstance(value, Namespace) else []
        if prefix in known or not children:
            leaves[prefix] = value.as_dict() if isinstance(value, Namespace) else value
            return
        for key in children:
            walk(f"{prefix}.{key}", value[key])

    for key in given.keys(branches=True, nested=False):
        walk(key, given[key])
    return leaves


def _checked(given: dict[str, Any]) -> BenchConfig:
    """The `BenchConfig` of `given` ({dotted key: value}, what the user set), or `OptionError`
    listing every mistake, each with its key."""
    parser = _typed_parser()
    known = set(_known_keys())
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in given.items():
        if key in GROUPS:
            if value not in (None, {}):  # `edit:` with every key commented out is an empty group
                problems.append(f"{key}: expected a mapping of {key}.* keys, got {value!r}")
            continue
        if key not in known:
            problems.append(_unknown(key, known))
            continue
        nested: dict[str, Any] = {}
        head, _, leaf = key.rpartition(".")
        (nested.setdefault(head, {}) if head else nested)[leaf] = value
        try:
            parsed = parser.parse_object(nested, defaults=False)
        except argparse.ArgumentError as error:
            problems.append(_type_problem(key, value, error))
            continue
        values[key] = _plain(parsed[key])
    defaults = {key: value for key, value in _defaults().items() if key not in given}
    problems += _range_problems({**defaults, **values}, set(values) | set(defaults))
    problems.sort(key=lambda problem: _position(problem, list(given)))
    if problems:
        count = f"{len(problems)} mistakes" if len(problems) > 1 else "a mistake"
        raise OptionError(f"nti bench: the config has {count}: " + "; ".join(problems))
    merged = {**defaults, **values}
    return BenchConfig(
        **{key: merged[key] for key in BenchConfig.__dataclass_fields__ if key not in GROUPS},
        # the groups hold what was set (nti fit and nti predict keep their own defaults), the
        # model its bench default, the networks all of theirs
        model={"pretrained": DEFAULT_MODEL, **_group(values, "model")},
        trainer=_group(values, "trainer"),
        edit=_group(values, "edit"),
        score=_group(merged, "score"),
    )


def _position(problem: str, order: list[str]) -> int:
    """Where the key a problem starts with ("key: ...") comes in `order` (the keys as the config
    files and the words give them), so that the problems are listed in that order."""
    key = problem.split(":")[0]
    return next((n for n, given in enumerate(order) if given == key or given.startswith(key + ".")), len(order))


def _plain(value: Any) -> Any:
    """`value` as YAML and JSON hold it: jsonargparse's namespaces (a trainer.logger's class_path and
    init_args) as mappings, its paths as strings; the stages get it as JSON (`run._flags`)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if key != "__path__"}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _group(values: dict[str, Any], group: str) -> dict[str, Any]:
    """The `group.*` entries of `values`, by their key within the group."""
    return {key[len(group) + 1 :]: value for key, value in values.items() if key.startswith(group + ".")}


def _unknown(key: str, known: set[str]) -> str:
    """The problem of a key no parser option has, with the closest known key when one is close."""
    head = key.split(".")[0]
    if key in {f"model.{name}" for name in SET_BY_BENCH}:
        return f"{key}: set by nti bench itself (from methods and output_dir)"
    groups = {name.split(".")[0] for name in known if "." in name}
    if head not in groups and "." in key:
        key = head  # an unknown group: name it, not each of its keys
    if "." in key:  # a key of a known group: the closest of that group's keys
        close = difflib.get_close_matches(key.split(".", 1)[1], sorted(name.split(".", 1)[1] for name in known
                                                                         if name.startswith(head + ".")), n=1)
        close = [f"{head}.{name}" for name in close]
    else:
        close = difflib.get_close_matches(key, sorted(name for name in known | groups if "." not in name), n=1)
    return f"{key}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def _type_problem(key: str, value: Any, error: Exception) -> str:
    """The problem of a value of the wrong type: what `key` takes, and what it got."""
    hint = _hints().get(key)
    if hint is None:  # a key whose annotation cannot be read: jsonargparse's own words
        return f"{key}: {_one_line(str(error))}"
    return f"{key}: expected {_describe(hint)}, got {value!r}"


def _range_problems(values: dict[str, Any], checked: set[str]) -> list[str]:
    """What the types allow but a run cannot use, for the keys of `checked` (those whose type is right).

    The model's checks repeat `NullTextInversion`'s (raised there only once `nti fit` starts).
    """
    problems = []

    def check(key: str, ok: bool, must: str) -> None:
        if key in checked and not ok:
            problems.append(f"{key}: {must}, got {values[key]!r}")

    check("demo_samples", values.get("demo_samples", 0) >= 0, "must be 0 (no demo) or more")
    check("demo_resolution", values.get("demo_resolution", 0) >= MIN_DEMO_RESOLUTION,
          f"must be at least {MIN_DEMO_RESOLUTION}")
    check("batch_size", values.get("batch_size", 0) >= 1, "must be at least 1")
    for key in ("root", "output_dir"):
        check(key, bool(str(values.get(key, "")).strip()), "must name a folder")
    if "methods" in checked:
        problems += _names_problems("methods", values["methods"], METHODS, "method")
    problems += _editor_problems(values, checked)
    for key in ("model.num_inference_steps", "model.num_inner_steps", "model.sync_every"):
        check(key, values.get(key, 0) >= 1, "must be at least 1")
    for key in ("edit.cross_replace_steps", "edit.self_replace_steps"):
        check(key, _fractions(values.get(key)), "must be a fraction in [0, 1] or a [start, end] pair of them")
    for key in ("edit.blend_threshold", "edit.blend_start"):
        check(key, _fractions(values.get(key)), "must be a fraction in [0, 1]")
    for key in ("score.dino", "score.clip", "score.lpips"):
        check(key, values.get(key) is not True, "a folder, a hub id or none")
    if "score.device" in checked and values.get("score.device") is not None:
        reason = _device_problem(str(values["score.device"]))
        if reason:
            problems.append(f"score.device: {reason}")
    return problems


def can_edit(method: str, editor: str) -> bool:
    """Whether the editor called `editor` edits the inversions of the method called `method`:
    EDICT's take no editor's control, Plug-and-Play and Pix2Pix-Zero run their own loops of plain
    DDIM steps (not edit-friendly DDPM's or ProxNPI's).

    Args:
        method (`str`): an inversion method's name.
        editor (`str`): an editor's name.
    """
    inversion = INVERSION_REGISTRY[method]
    if editor == P2P:
        return True
    return inversion.edits_under_control and (EDITOR_SETTINGS[editor].runs_any_rule or inversion.plain_sampling)


def _names_problems(key: str, names: list[str], choices: Sequence[str], what: str) -> list[str]:
    """The mistake of a list of names (`methods`, `editors`): one not among `choices`, none, or one twice."""
    unknown = [name for name in names if name not in choices]
    if unknown:
        return [f"{key}: {unknown} not among {list(choices)}"]
    if not names:
        return [f"{key}: empty; give some of {list(choices)}"]
    if len(set(names)) < len(names):
        return [f"{key}: {names} names {'an' if what[0] in 'aeiou' else 'a'} {what} twice"]
    return []


def _editor_problems(values: dict[str, Any], checked: set[str]) -> list[str]:
    """The mistakes of `editors` and `editor_methods`: unknown names, repeats, a method not run, an
    editor that cannot edit a method's inversions."""
    problems: list[str] = []
    editors, pairs = values.get("editors", [P2P]), values.get("editor_methods", [])
    if "editors" in checked:
        problems += _names_problems("editors", editors, EDITORS, "editor")
    if "editor_methods" in checked or "editors" in checked:
        others = [e for e in editors if e in EDITORS and e != P2P]
        methods = values.get("methods", list(METHODS))
        missing = [m for m in pairs if m not in methods]
        if missing and others:
            problems.append(f"editor_methods: {missing} not among the methods run ({methods})")
        for method in (m for m in pairs if m in INVERSION_REGISTRY):
            cannot = [e for e in others if not can_edit(method, e)]
            if cannot:
                problems.append(
                    f"editor_methods: {method}'s inversions cannot be edited by {cannot} (its own sampling); "
                    "use p2p for it"
                )
    return problems


def _fractions(value: Any) -> bool:
    """Whether `value` is a fraction in [0, 1], a [start, end] pair of them, or a per-word mapping of either."""
    if isinstance(value, dict):
        return all(_fractions(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_fractions(item) for item in value) and value[0] <= value[1]
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _device_problem(device: str) -> Optional[str]:
    """Why `device` cannot run the scoring networks (`weights.resolve_device`'s checks), or `None`."""
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{device!r} is not a device name (cpu, cuda, cuda:1, ...)"
    if resolved.type == "cuda" and not torch.cuda.is_available():
        return f"{device!r}: CUDA is not available on this machine"
    return None


def _describe(hint: Any) -> str:
    """`hint` in words: a class's name, a Literal's values, the members of a Union ("or")."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        literals = [value for member in members if typing.get_origin(member) is Literal
                    for value in typing.get_args(member)]
        literals = list(dict.fromkeys(map(str, literals)))  # 64 and "64" read the same
        words = [_describe(member) for member in members
                 if typing.get_origin(member) is not Literal and member is not type(None)]
        if literals:
            words.insert(0, "one of " + ", ".join(map(str, literals)))
        if type(None) in members:
            words.append("null")
        return " or ".join(words)
    if origin is Literal:
        return "one of " + ", ".join(map(str, members))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_describe(member) for member in members)}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _one_line(text: str) -> str:
    """`text` on one line (jsonargparse's messages span several)."""
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- the parsers


@lru_cache(maxsize=None)
def _typed_parser() -> ArgumentParser:
    """The parser of a run's config with every key's type, default and help: it checks each value."""
    return _run_parser()


def _run_parser(conflict_handler: str = "error") -> ArgumentParser:
    """A new parser of a run's config: every key with its type, default and one line of help.

    Args:
        conflict_handler (`str`, defaults to "error"): argparse's; "resolve" lets `--help`'s parser
            give `--score` to scoring a folder (a run's hidden `--score CONFIG` loses it).
    """
    from lightning.pytorch import Trainer

    from nti_lightning.training.module import NullTextInversion

    parser = ArgumentParser(prog="nti bench", usage=USAGE, description=DESCRIPTION, exit_on_error=False,
                            print_config=None, formatter_class=_HelpFormatter, conflict_handler=conflict_handler)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML config of the keys below (configs/bench_demo.yaml, configs/pie_bench.yaml)")
    parser.add_argument("--print_config", action="store_true", help="print the checked config as YAML and exit")
    parser.add_class_arguments(BenchConfig, skip=set(GROUPS), help="Run the benchmark: nti bench --config FILE")
    parser.add_class_arguments(NullTextInversion, "model", skip=set(SET_BY_BENCH), help=(
        "model: nti fit's model.* options (the edits take pretrained, guidance_scale, allow_model_mismatch and "
        "channels_last)"))
    parser.set_defaults({"model.pretrained": DEFAULT_MODEL, "model.ddim_baseline": False})
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False,
                               help="trainer: the Trainer's options, for nti fit and nti predict (nti fit's defaults)")
    parser.add_class_arguments(EditSettings, "edit")
    parser.add_class_arguments(ScoreSettings, "score")
    for action in parser._actions:
        if action.dest in GROUPS:
            # `--model CONFIG` (a group's keys from a file): the lenient parser has no such option
            action.help = argparse.SUPPRESS
        elif action.help and action.help is not argparse.SUPPRESS:
            action.help = _first_sentence(action.help)
        # nor `--methods+ VALUE` (append to a list), which needs the list's type to read VALUE
        action.option_strings = [option for option in action.option_strings if not option.endswith("+")]
    return parser


def _lenient_parser() -> ArgumentParser:
    """A copy of `_typed_parser` whose options take any value (read as YAML), so that reading the
    words and the config files stops only at what does not parse at all, never at a wrong type."""
    typed = _typed_parser()
    parser = ArgumentParser(prog="nti bench", exit_on_error=False, print_config=None)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--print_config", action="store_true")
    for action in typed._actions:
        if (not action.option_strings or action.default is argparse.SUPPRESS or isinstance(action, ActionConfigFile)
                or action.dest == "print_config"):
            continue  # --help, a group's --model CONFIG, a class's --KEY.help
        parser.add_argument(*action.option_strings, type=Any, default=None)
    return parser


@lru_cache(maxsize=None)
def _known_keys() -> tuple[str, ...]:
    """Every key of a run's config, dotted (`model.num_inner_steps`), in `--help`'s order."""
    return tuple(action.dest for action in _typed_parser()._actions
                 if action.option_strings and action.default is not argparse.SUPPRESS
                 and not isinstance(action, ActionConfigFile) and action.dest != "print_config")


@lru_cache(maxsize=None)
def _defaults() -> dict[str, Any]:
    """Every key's default, dotted."""
    defaults = _typed_parser().get_defaults()
    return {key: defaults[key] for key in _known_keys()}


@lru_cache(maxsize=None)
def _hints() -> dict[str, Any]:
    """Every key's type annotation, dotted (for the messages of values of the wrong type)."""
    from lightning.pytorch import Trainer

    from nti_lightning.training.module import NullTextInversion

    hints = {key: hint for key, hint in typing.get_type_hints(BenchConfig).items() if key not in GROUPS}
    for group, source in (("model", NullTextInversion.__init__), ("trainer", Trainer.__init__), ("edit", EditSettings),
                          ("score", ScoreSettings)):
        try:
            found = typing.get_type_hints(source)
        except (NameError, TypeError):  # an annotation that names what is not importable here
            continue
        hints.update({f"{group}.{key}": hint for key, hint in found.items() if key != "return"})
    return hints


def _first_sentence(text: str) -> str:
    """The first sentence of a docstring's entry, on one line (`nti bench --help` gives a key one
    line): up to the first full stop outside brackets that ends no abbreviation ("e.g.")."""
    line, depth = _one_line(text), 0
    for index, char in enumerate(line):
        depth += (char in "([{") - (char in ")]}")
        if char == "." and depth <= 0 and line[index + 1 : index + 2] in ("", " "):
            word = line[:index].rsplit(" ", 1)[-1].lstrip("(")
            if word.lower() not in ("e.g", "i.e", "etc", "vs", "cf"):
                return line[: index + 1]
    return line


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help format, its description kept as written (the two ways, aligned)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


# ----------------------------------------------------------------------------- scoring a folder


def _add_score_options(parser: ArgumentParser, aliases: bool) -> None:
    """`--score DIR` and the `--bench.*` options of scoring a folder, as one group of `parser`.

    Args:
        parser (`ArgumentParser`): where to add them.
        aliases (`bool`): also accept `--root` and `--score.dino` ... as a run's config names
            them (not in `--help`'s parser, which has those of a run).
    """
    group = parser.add_argument_group("Score a folder of outputs: nti bench --score DIR --bench.root ROOT")
    also = lambda *names: list(names) if aliases else []  # noqa: E731
    group.add_argument("--score", metavar="DIR", type=str, required=True,
                       help="folder of <method>/annotation_images/<image_path> outputs (or one method's folder)")
    group.add_argument("--bench.root", *also("--root"), metavar="ROOT", type=str, required=True,
                       help="the PIE-Bench folder: mapping_file.json, annotation_images/ (also --root)")
    group.add_argument("--bench.methods", type=Optional[str], default=None,
                       help="comma-separated methods to score (default: all)")
    group.add_argument("--bench.edit_types", type=Optional[str], default=None,
                       help="comma-separated editing_type_ids (default: all)")
    for name, default, text in (
        ("dino", DINO_DEFAULT, "DINO ViT-B/8 folder or cached hub id; none: off"),
        ("clip", CLIP_DEFAULT, "CLIP ViT-L/14 folder or cached hub id; none: off"),
        ("lpips", LPIPS_DEFAULT,
         "squeeze (torch hub cache) or a torch hub folder holding checkpoints/squeezenet1_1-*.pth; none: off"),
        ("device", None, "cpu or cuda (default: cuda when there is a GPU)"),
    ):
        group.add_argument(f"--bench.{name}", *also(f"--score.{name}"), type=Optional[str], default=default,
                           help=f"{text} (also --score.{name})")
    for name, text in (("output", "per-image CSV (default: DIR/pie_bench.csv)"),
                       ("summary", "Markdown summary (default: DIR/pie_bench.md)"),
                       ("tensorboard", "also log the means for TensorBoard here")):
        group.add_argument(f"--bench.{name}", type=Optional[str], default=None, help=text)


def parse_score_args(args: Sequence[str]) -> Namespace:
    """The options of `nti bench --score DIR --bench.root ROOT [--bench.KEY VALUE ...]`.

    Args:
        args (`Sequence[str]`): the words after `nti bench`.

    Returns:
        `Namespace`: `score` (the outputs folder) and `bench` (root, methods, edit_types, dino,
        clip, lpips, device, output, summary, tensorboard).

    Raises:
        `OptionError`: the words do not parse (`usage_error`).
    """
    args = list(args)
    if wants_help(args):
        print_help()
        raise SystemExit(0)
    parser = ArgumentParser(prog="nti bench", exit_on_error=False, print_config=None)
    _add_score_options(parser, aliases=True)
    try:
        return parser.parse_args(args)
    except argparse.ArgumentError as error:
        raise usage_error(str(error)) from None


def _help_parser() -> ArgumentParser:
    """`nti bench --help`'s parser: a run's keys, then scoring's. It never parses: the two cannot
    share one parser, as a config's `score:` group and `--score DIR` would be one key."""
    parser = _run_parser(conflict_handler="resolve")
    _add_score_options(parser, aliases=False)
    return parser
