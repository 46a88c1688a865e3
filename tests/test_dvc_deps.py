"""Every dvc.yaml stage depends on exactly the code it runs: the import closure of its stage module.

A module missing from a stage's deps means an edit to it leaves stale outputs that ``dvc repro`` calls up to
date; a module that the stage does not import would rerun it (re-encoding ImageNet, say) for nothing. The
closure is computed statically from the source (``import`` statements, including those inside functions), so
the test needs no imports of its own and sees lazy imports too.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def _module_file(root: Path, name: str) -> Path | None:
    path = root / (name.replace(".", "/") + ".py")
    if path.is_file():
        return path
    init = root / name.replace(".", "/") / "__init__.py"
    return init if init.is_file() else None


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_closure(root: Path, module: str) -> set[str]:
    """Project modules (repo-relative files) that ``module`` imports, directly or not, itself included.
    Package ``__init__.py`` files are left out: they hold no code (test_package_inits_hold_no_code)."""
    files, seen, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith(PACKAGES):
            continue
        seen.add(name)
        path = _module_file(root, name)
        if path is None:
            continue
        if path.name != "__init__.py":
            files.add(path.relative_to(root).as_posix())
        todo.extend(_imported_names(path))
    return files


def test_package_inits_hold_no_code():
    """What lets the closure skip them: an ``__init__.py`` with only a docstring and ``__version__``."""
    for init in [p for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")]:
        body = ast.parse(init.read_text()).body
        code = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
                and not (isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__version__"])]
        assert not code, f"{init.relative_to(ROOT)} holds code; move it into a module"


def stage_module(cmd: str) -> str:
    """``rcg train-rdm`` -> ``stages.train_rdm`` (as stages/cli.py maps it)."""
    from stages.cli import STAGE_MODULES

    name = cmd.split()[1].replace("-", "_")
    return f"stages.{STAGE_MODULES.get(name, name)}"


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.endswith(".py")}


def _definitions():
    """(name, definition) for each stage, foreach stages expanded to their first item (all share the code)."""
    for name, stage in _stages().items():
        yield name, stage.get("do", stage)


@pytest.mark.parametrize("name,stage", list(_definitions()), ids=[n for n, _ in _definitions()])
def test_stage_deps_are_its_import_closure(name, stage):
    closure = import_closure(ROOT, stage_module(stage["cmd"]))
    declared = _code_deps(stage)
    missing, extra = sorted(closure - declared), sorted(declared - closure)
    assert not missing and not extra, (f"dvc.yaml stage {name!r}: deps missing {missing} (edits to them would "
                                       f"leave stale outputs); deps not imported {extra} (they rerun it for "
                                       "nothing)")


def _dvc(cwd: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run([str(bin_dir / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _changed_stages(status: str) -> set[str]:
    """Stage names in ``dvc status`` output (lines ``name:`` or ``name@item:`` at column 0)."""
    return {line.rstrip(":").split("@")[0] for line in status.splitlines()
            if line and not line.startswith((" ", "\t")) and line.endswith(":")}


def test_editing_a_module_changes_exactly_the_stages_that_import_it(tmp_path):
    """In a scratch copy with every stage's deps recorded as up to date (``dvc commit`` of a lock file written
    for the current code, without running anything), an edit to one library module makes ``dvc status``
    report the stages whose closure holds it, and no others."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    _dvc(tmp_path, "init", "--no-scm", "-q")
    # Mark every stage as run with today's code: outputs faked as empty files/folders, then `dvc commit -f`.
    for name, stage in _stages().items():
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            out = next(iter(out)) if isinstance(out, dict) else out
            path = tmp_path / out.replace("${paths.data}", "data").replace("${paths.metrics}", "metrics")
            if "$" in str(path):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix:
                path.touch()
            else:
                path.mkdir(exist_ok=True)
    _dvc(tmp_path, "commit", "-f", "-q")
    assert _changed_stages(_dvc(tmp_path, "status")) == set()

    target = "pipeline/eval/metrics.py"
    with open(tmp_path / target, "a") as f:
        f.write("\n# an edit\n")
    expected = {name for name, stage in _definitions() if target in _code_deps(stage)}
    assert expected, f"no stage imports {target}"
    assert _changed_stages(_dvc(tmp_path, "status")) == expected


def write_closures_into_dvc_yaml() -> None:
    """Rewrite each stage's ``*.py`` deps in dvc.yaml to its import closure (other deps kept, in place):
    ``python tests/test_dvc_deps.py`` after adding or moving imports."""
    import re

    sys.path.insert(0, str(ROOT))
    text = (ROOT / "dvc.yaml").read_text().splitlines(keepends=True)
    stages = yaml.safe_load("".join(text))["stages"]
    out, current, i = [], None, 0
    while i < len(text):
        line = text[i]
        if match := re.match(r"^  ([a-z_]+):", line):
            current = match.group(1)
        if current and re.match(r"^ +deps:\s*$", line):
            indent = re.match(r"^( +)", line).group(1) + "  "
            out.append(line)
            i += 1
            others = []
            while i < len(text) and text[i].startswith(indent + "- "):
                if not (item := text[i].strip()[2:]).endswith(".py"):
                    others.append(item)
                i += 1
            stage = stages[current].get("do", stages[current])
            code = sorted(import_closure(ROOT, stage_module(stage["cmd"])))
            out.extend(f"{indent}- {dep}\n" for dep in [*others, *code])
            continue
        out.append(line)
        i += 1
    (ROOT / "dvc.yaml").write_text("".join(out))


if __name__ == "__main__":
    write_closures_into_dvc_yaml()
