"""The layering contract: each package imports only from its own floor and the floors below.

Floors, bottom to top (docs/architecture.md). Every ``import fastdp...`` in every module of the
package counts, at module level or inside a function, so a lazy import cannot hide an arrow
running back up. ``fastdp/__init__.py`` is the public facade (it re-exports from the floors) and
is not itself a floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastdp"

FLOORS: list[set[str]] = [
    {"_C", "_core", "ops", "reference", "noise", "accounting", "accountants", "atomic"},  # the core
    # engine, and Opacus's submodule names re-exporting it (an Opacus script changes only imports)
    {"engine", "layers", "validators", "utils", "data_loader", "optimizers", "grad_sample"},
    {"data", "models", "viz"},
    {"federated"},
    {"attacks"},
    {"report"},
    {"experiment"},
    {"flower"},
    {"cli", "__main__"},
]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}
# `import fastdp` / `from fastdp import PrivacyEngine`: the facade re-exports the engine and the core.
FACADE_FLOOR = FLOOR_OF["engine"]


def _unit(module: str) -> str:
    """'fastdp.federated.site' -> 'federated' (the top-level package or module under fastdp)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _fastdp_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of fastdp.* in the file (absolute or relative)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = "fastdp." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fastdp"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "fastdp":
                continue
            if module == "fastdp":  # from fastdp import ops, flower, ...: each module name is a unit
                out += [(node.lineno, f"fastdp.{a.name}" if a.name in FLOOR_OF else "fastdp") for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_unit_has_a_floor():
    units = {_unit("fastdp." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in _modules()}
    assert units <= set(FLOOR_OF), f"modules with no floor in the contract: {sorted(units - set(FLOOR_OF))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path):
    here = _unit("fastdp." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = []
    for line, module in _fastdp_imports(path):
        there = _unit(module)
        if there == here:
            continue
        floor = FLOOR_OF[there] if there else FACADE_FLOOR
        if floor > FLOOR_OF[here]:
            upward.append(f"line {line}: {module} (floor {floor}) from floor {FLOOR_OF[here]}")
    assert not upward, f"{path.relative_to(PACKAGE)} imports upward:\n" + "\n".join(upward)


def test_the_contract_catches_an_upward_import(tmp_path):
    # The check itself: a module of floor 'federated' importing 'experiment' is reported.
    bad = PACKAGE / "federated" / "_contract_probe.py"
    try:
        bad.write_text("def f():\n    from fastdp.experiment import config\n")
        with pytest.raises(AssertionError, match="imports upward"):
            test_no_import_runs_back_up(bad)
    finally:
        bad.unlink()
