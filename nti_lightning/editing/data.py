"""`EditDataModule`: the edit specs of a predict run, inline, from a JSONL file or from PIE-Bench.

Specs are checked when they are edited, not when they are read, so that one bad spec (or one
unreadable line of the file) becomes a reported failure instead of stopping the whole run. Each
item carries a unique id, fixed here, that names its output files and its failure record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from nti_lightning.data.pie_bench import read_mapping
from nti_lightning.editing.pie_bench import benchmark_edit
from nti_lightning.errors import (
    BenchmarkError,
    InputNotFoundError,
    OptionError,
    unsafe_id_reason,
)

#: Characters kept in ids (they become file names).
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EditDataModule(pl.LightningDataModule):
    """Edit specs (see `nti_lightning.editing.specs`) served one per predict step.

    Give `edits`, `edits_file`, `benchmark`, or several (inline specs come first, the benchmark's
    last). Relative artifact paths are relative to the working directory.

    Args:
        edits (`list[dict]`, *optional*): specs written inline in the config.
        edits_file (`str`, *optional*): a JSONL file with one spec per line (blank lines and lines
            starting with "#" are skipped).
        benchmark (`str`, *optional*): a PIE-Bench `mapping_file.json`: one edit per sample, of
            `<inversions>/<id>.safetensors`, with the benchmark's settings
            (`nti_lightning.editing.pie_bench.benchmark_edit`).
        inversions (`str`, defaults to "inversions"): the folder of the benchmark's inversions.
        benchmark_options (`dict`, *optional*): overrides of the benchmark's edit settings, e.g.
            `{"cross_replace_steps": 0.8}` (keys of `nti_lightning.editing.pie_bench.BENCHMARK_OPTIONS`).
        batch_size (`int`, defaults to 8): specs sampled together, every spec's rows in each UNet
            call; results do not depend on it (up to the float rounding of a larger batch).
    """

    def __init__(
        self,
        edits: Optional[list[dict[str, Any]]] = None,
        edits_file: Optional[str] = None,
        benchmark: Optional[str] = None,
        inversions: str = "inversions",
        benchmark_options: Optional[dict[str, Any]] = None,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise OptionError(f"data.batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        if not edits and not edits_file and not benchmark:
            raise OptionError(
                "no edits: set `edits` (a list of specs), `edits_file` (a JSONL file) or `benchmark` (a PIE-Bench "
                "mapping_file.json)"
            )
        self.edits = list(edits or [])
        self.edits_file = edits_file
        self.benchmark = benchmark
        self.inversions = inversions
        self.benchmark_options = dict(benchmark_options or {})
        self.items: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        self.items = edit_items(self.edits, self.edits_file) + benchmark_items(
            self.benchmark, self.inversions, self.benchmark_options
        )

    def predict_dataloader(self) -> DataLoader:
        # `batch_size` specs per step; Lightning shards the specs across devices with its unpadded
        # predict sampler.
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=False, collate_fn=_as_list)


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch of specs as the list of specs (no tensor collation of their fields)."""
    return list(batch)


def edit_items(edits: list[Any], edits_file: Optional[str]) -> list[dict[str, Any]]:
    """`{"id", "where", "spec", "error"}` per spec; `error` is set for a line that is not JSON."""
    # (where, name to fall back on, spec, error)
    raw: list[tuple[str, str, Any, Optional[str]]] = [
        (f"edits[{i}]", f"edit{i}", spec, None) for i, spec in enumerate(edits)
    ]
    if edits_file:
        path = Path(edits_file)
        if not path.is_file():
            raise InputNotFoundError(f"{path}: edits file not found")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where, fallback = f"{path}:{number}", f"{path.stem}-line{number}"
            try:
                raw.append((where, fallback, json.loads(line), None))
            except json.JSONDecodeError as error:
                raw.append((where, fallback, None, f"{where}: not valid JSON ({error.msg} at column {error.colno})"))
    seen: dict[str, int] = {}
    items = []
    for where, fallback, spec, error in raw:
        own = spec.get("id") if isinstance(spec, dict) else None
        unsafe = unsafe_id_reason(str(own)) if isinstance(own, (str, int)) else None
        if unsafe is not None and error is None:  # an id names output files: it must stay in the folder
            error, spec = f"{where}: {unsafe}", {k: v for k, v in spec.items() if k != "id"}
        name = _base_id(spec, fallback)
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}-{seen[name]}"
        items.append({"id": unique, "where": where, "spec": spec, "error": error})
    return items


def benchmark_items(mapping_file: Optional[str], inversions: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """One item per sample of a PIE-Bench mapping file (none without one); an entry that cannot
    be used becomes a failed item naming it."""
    if not mapping_file:
        return []
    try:
        samples, unusable = read_mapping(mapping_file)
    except BenchmarkError as error:
        raise InputNotFoundError(str(error)) if not Path(mapping_file).is_file() else OptionError(str(error)) from error
    items = [{"id": key, "where": mapping_file, "spec": None, "error": reason} for key, reason in unusable]
    for sample in samples:
        spec = benchmark_edit(sample, Path(inversions) / f"{sample.id}.safetensors", options)
        items.append({"id": sample.id, "where": f"{mapping_file}: sample {sample.id!r}", "spec": spec, "error": None})
    return items


def _base_id(spec: Any, fallback: str) -> str:
    """The spec's own id, else `<artifact stem>_<kind>`, else `fallback`; made file-name safe."""
    name = fallback
    if isinstance(spec, dict):
        if isinstance(spec.get("id"), (str, int)) and str(spec["id"]).strip():
            name = str(spec["id"])
        elif isinstance(spec.get("artifact"), str):
            name = f"{Path(spec['artifact']).stem}_{spec.get('kind', 'replace')}"
    return _UNSAFE.sub("_", name).strip("._") or "edit"
