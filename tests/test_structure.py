"""The house rules of docs/design-notes.md ("Where things live"), read from the source.

Imports run one way (a module imports only from lower floors, lazily or not), only
``caldm/distributed`` touches Ray, DeepSpeed or MLflow, and ``caldm/distributed`` stays wiring:
every file under 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "caldm"

#: Floors, lowest first: a module may import from its own package or a lower floor only.
FLOORS: dict[str, int] = {
    "caldm.errors": 0,
    "caldm.config": 1,
    "caldm.progress": 1,
    "caldm.search_space": 2,
    "caldm.data": 2,
    "caldm.diffusion": 2,
    "caldm.nn": 3,
    "caldm.anatomy": 3,
    "caldm.preview": 3,
    "caldm.metrics": 4,
    "caldm.validation": 4,
    "caldm.bundle": 5,
    "caldm.stages": 5,
    "caldm.segmentation": 5,
    "caldm.pipeline": 6,
    "caldm.bench": 7,
    "caldm.distributed": 8,
    "caldm.cli": 9,
    "caldm.__main__": 10,
}
WIRING = ("ray", "deepspeed", "mlflow")


def _home(module: str) -> str:
    """``caldm.data.io`` -> ``caldm.data``; a third-party module -> its top package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "caldm" else parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "caldm":  # from caldm import metrics
                found += [(node.lineno, f"caldm.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((".".join(p for p in parts if p != "__init__"), path))
    return out


def test_every_module_has_a_floor() -> None:
    missing = sorted({_home(m) for m, _ in _modules()} - set(FLOORS) - {"caldm"})
    assert not missing, f"give these a floor in FLOORS: {missing}"


def test_imports_run_one_way() -> None:
    wrong = []
    for module, path in _modules():
        home = _home(module)
        if home == "caldm":  # the package's __init__
            continue
        for line, target in _imports(path):
            there = _home(target)
            if there in FLOORS and there != home and FLOORS[there] >= FLOORS[home]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "imports that run up (or sideways):\n" + "\n".join(wrong)


def test_only_distributed_touches_ray_deepspeed_mlflow() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for module, path in _modules()
        if _home(module) != "caldm.distributed"
        for line, target in _imports(path)
        if _home(target) in WIRING
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted((PACKAGE / "distributed").glob("*.py")), ids=str)
def test_distributed_files_stay_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines < 400, f"{path.name}: {lines} lines; move what is not wiring to a lower floor"


def test_the_rules_can_fail(tmp_path: Path) -> None:
    """The checker sees a lazy upward import (so a violation would not pass unseen)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from caldm.distributed.train import train\n")
    assert (2, "caldm.distributed.train") in _imports(bad)
    assert FLOORS[_home("caldm.distributed.train")] > FLOORS["caldm.data"]
