"""The library's layers point one way: core -> data -> models -> {losses, samplers} -> {train, gen, eval} -> stages.

A module may import its own package and the layers below it, never a layer above nor a sibling of its own layer
(train, gen and eval stand side by side and do not import each other). Parsed from the source (``import``
statements anywhere in a file, lazy ones included), like test_dvc_deps, so nothing is imported to check.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [("core",), ("data",), ("models",), ("losses", "samplers"), ("train", "gen", "eval")]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "pipeline":  # `from pipeline import models`
                found += [(node.lineno, f"pipeline.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    wrong = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 3:
            continue  # pipeline/__init__.py
        package = parts[1]
        for line, name in imports(path):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if name == "stages" or name.startswith("stages."):
                wrong.append(f"{where} (the library never imports a stage)")
            elif name.startswith("pipeline."):
                other = name.split(".")[1]
                if other != package and RANK.get(other, -1) >= RANK[package]:
                    wrong.append(f"{where} ({other} is not below {package})")
    return wrong


def test_every_subpackage_has_a_layer():
    packages = {p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py")}
    assert packages <= set(RANK), f"place {sorted(packages - set(RANK))} in LAYERS"


def test_imports_point_down_the_layers():
    wrong = violations(ROOT)
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_a_wrong_import_is_caught(tmp_path):
    for package, source in [("core", "from pipeline.data.shards import INDEX_FILE\n"),
                            ("models", "def f():\n    from pipeline.train.loop import TrainLoop\n"),
                            ("gen", "import pipeline.eval.metrics\n"), ("data", "from stages import encode\n")]:
        (tmp_path / "pipeline" / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipeline" / package / "m.py").write_text(source)
    assert len(violations(tmp_path)) == 4
