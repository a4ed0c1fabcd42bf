"""The package's layers (docs/ARCHITECTURE.md), checked by import-linter's contracts in pyproject.toml.

Every import counts, at any depth: module level or inside a function. A lower layer never
imports a higher one, siblings on one line of the contract never import each other, and no
package's modules import each other in a cycle. And the code passes ruff (pyproject.toml).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and later")

importlinter_cli = pytest.importorskip(
    "importlinter.cli", reason="import-linter is a test extra: pip install -e '.[test]'"
)


def test_layers_and_cycles_contracts_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    # import-linter configures logging with `disable_existing_loggers`: every logger made so far
    # (the package's among them) would stay silent for the tests after this one.
    made = [logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    loggers = [logging.getLogger(), *made]
    for logger in loggers:
        monkeypatch.setattr(logger, "disabled", logger.disabled)
    assert importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_every_package_and_module_is_in_a_layer() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")
    named = {name.strip() for layer in layers["layers"] for name in layer.replace(":", "|").split("|")}
    package = ROOT / "nti_lightning"
    present = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    present |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert present - set(layers.get("exhaustive_ignores", [])) == named
    assert {c["type"] for c in contracts} == {"layers", "acyclic_siblings"}


def test_the_code_passes_ruff() -> None:
    """Lines of at most 120 characters, sorted imports, no unused name ([tool.ruff] in pyproject.toml)."""
    ruff = pytest.importorskip("ruff", reason="ruff is a test extra: pip install -e '.[test]'")
    from ruff.__main__ import find_ruff_bin

    del ruff
    result = subprocess.run(
        [find_ruff_bin(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
