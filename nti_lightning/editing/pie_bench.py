"""PIE-Bench's edit settings: a sample of the mapping file as the edit spec the benchmark makes.

With another editor than Prompt-to-Prompt (`editor=`), the settings of that editor's script:
MasaCtrl (`run_editing_masactrl.py`): S = 4, L = 10, the source branch's prompt "" (the sample
is inverted with "", `nti bench` does so); Plug-and-Play (`run_editing_pnp.py`): its defaults,
and for a DDIM inversion the DDIM reconstruction at w = 1 one step ahead as the source branch
(`source_guidance_scale: 1`, `source_offset: 1`); Pix2Pix-Zero (`run_editing_pix2pix_zero.py`):
guidance 0.1, the source prompt as the caption, its DDIM and Direct rows editing its own
regularised DDIM inversion (`method: pix2pix_zero`), the Direct row retracing it (`retrace: true`).

`benchmark_edit` turns a sample (`nti_lightning.data.pie_bench.BenchSample`) into the edit spec
of the benchmark's Null-text + P2P row (`run_editing_p2p.py`): Refine with cross-attention
replaced for 0.4 of the steps and self-attention for 0.6, the target blend word reweighted x2,
LocalBlend on the blend words (threshold 0.3, from 0.2 of the steps); no blend and no reweight
where `blended_word` is "".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from nti_lightning.data.pie_bench import BenchSample
from nti_lightning.editing.editors import EDITOR_SETTINGS, P2P
from nti_lightning.errors import BenchmarkError
from nti_lightning.inversion.artifact import ArtifactError, Inversion
from nti_lightning.inversion.methods import REGISTRY

#: The benchmark's edit settings for every sample (`run_editing_p2p.py`); `benchmark_edit` takes overrides.
BENCHMARK_OPTIONS: dict[str, Any] = {
    "cross_replace_steps": 0.4,
    "self_replace_steps": 0.6,
    "reweight": 2.0,  # the target blend word's factor
    "blend_threshold": 0.3,
    "blend_start": 0.2,
}




def benchmark_edit(
    sample: BenchSample,
    artifact: str | Path,
    overrides: Optional[dict[str, Any]] = None,
    editor: str = P2P,
    method: Optional[str] = None,
) -> dict[str, Any]:
    """The edit spec (see `nti_lightning.editing.specs`) of `sample`'s inversion file `artifact`
    with the benchmark's settings (`BENCHMARK_OPTIONS`, each overridable in `overrides`); for an
    inversion whose method edits without a controller (EDICT), the prompts alone ("swap"); for
    another `editor`, its script's settings for the row of `method` (by default the artifact's
    method; see the module's documentation)."""
    settings = {**BENCHMARK_OPTIONS, **(overrides or {})}
    unknown = sorted(set(settings) - set(BENCHMARK_OPTIONS))
    if unknown:
        raise BenchmarkError(
            f"unknown benchmark edit setting(s) {unknown}; expected some of {sorted(BENCHMARK_OPTIONS)}"
        )
    if editor != P2P:
        return _editor_spec(sample, Path(artifact), editor, method or _method(Path(artifact)))
    options: dict[str, Any] = {
        "cross_replace_steps": settings["cross_replace_steps"],
        "self_replace_steps": settings["self_replace_steps"],
    }
    spec: dict[str, Any] = {
        "id": sample.id,
        "artifact": str(artifact),
        "prompts": [sample.original_prompt, sample.editing_prompt],
        "kind": "refine",
        "options": options,
    }
    if not _edits_under_control(Path(artifact)):
        return {**spec, "kind": "swap", "options": {}}
    if sample.blended_word is not None:
        source_word, target_word = sample.blended_word
        options.update(
            blend_words=[[source_word], [target_word]],
            blend_threshold=settings["blend_threshold"],
            blend_start=settings["blend_start"],
        )
        spec.update(kind="reweight")
        options.update(words={target_word: settings["reweight"]}, base="refine")
    return spec


def _editor_spec(sample: BenchSample, artifact: Path, editor: str, method: Optional[str]) -> dict[str, Any]:
    """The spec of `sample` for an editor other than Prompt-to-Prompt, with its script's settings
    for the row of `method` (the editor's `benchmark_*`)."""
    settings = EDITOR_SETTINGS[editor]
    source = settings.benchmark_source_prompt
    prompts = [sample.original_prompt if source is None else source, sample.editing_prompt]
    return {"id": sample.id, "artifact": str(artifact), "prompts": prompts, "editor": editor,
            "options": settings.benchmark_options(method)}


def _method(artifact: Path) -> Optional[str]:
    """The method name recorded in the inversion file `artifact` (None if it cannot be read)."""
    try:
        name = Inversion.read_metadata(artifact).get("method")
    except ArtifactError:
        return None
    return name if isinstance(name, str) else None


def _edits_under_control(artifact: Path) -> bool:
    """Whether the method of the inversion file `artifact` edits under a controller (True for a
    file that cannot be read: its edit fails later, naming the problem)."""
    try:
        name = Inversion.read_metadata(artifact).get("method")
    except ArtifactError:
        return True
    method = REGISTRY.get(name) if isinstance(name, str) else None
    return method is None or method.edits_under_control
