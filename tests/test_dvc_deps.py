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


@pytest.mark.integration
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
    from dvc.repo import Repo

    with Repo(str(tmp_path)) as repo:  # DVC resolves foreach instances and ${...} paths
        outs = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
    for path in outs:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".pt", ".json", ".csv", ".md", ".parquet"):
            path.touch()
        else:
            path.mkdir(exist_ok=True)
    _dvc(tmp_path, "commit", "-f", "-q")
    always = {name for name, stage in _stages().items() if stage.get("always_changed")}  # scan: checked every time
    assert always == {"scan"} and _changed_stages(_dvc(tmp_path, "status")) == always

    target = "pipeline/eval/metrics.py"
    with open(tmp_path / target, "a") as f:
        f.write("\n# an edit\n")
    expected = {name for name, stage in _definitions() if target in _code_deps(stage)}
    assert expected, f"no stage imports {target}"
    assert _changed_stages(_dvc(tmp_path, "status")) == expected | always


def _tracked(key: str) -> list[str]:
    """What dvc.yaml lists for ``key``: the key itself when it holds no how-to-run field, else its children's
    entries (a how-to-run child left out), so a section is one line wherever it can be."""
    from pipeline.core.config import Params, Section, what_to_compute

    cls = Params
    for part in key.split("."):
        cls = cls.model_fields[part].annotation
    leaves = what_to_compute(key)
    if not (isinstance(cls, type) and issubclass(cls, Section)):
        return leaves
    children = [f"{key}.{name}" for name in cls.model_fields]
    if leaves == [leaf for child in children for leaf in _leaves_of(child)]:
        return [key]
    return [entry for child in children if what_to_compute(child) for entry in _tracked(child)]


def _leaves_of(key: str) -> list[str]:
    """Every leaf under ``key``, how-to-run fields included."""
    from pipeline.core.config import Params, Section

    cls = Params
    for part in key.split("."):
        cls = cls.model_fields[part].annotation
    if not (isinstance(cls, type) and issubclass(cls, Section)):
        return [key]
    return [leaf for name in cls.model_fields for leaf in _leaves_of(f"{key}.{name}")]


def stage_params(stage: dict) -> list[str]:
    """A stage's dvc.yaml ``params``: its module's ``PARAMS``, each section narrowed to its what-to-compute part
    (:func:`_tracked`); ``{item}`` becomes the foreach variable."""
    import importlib

    variable = "${key}" if "${key}" in stage["cmd"] else "${item}"
    keys = []
    for key in importlib.import_module(stage_module(stage["cmd"])).PARAMS:
        keys += [key.replace("{item}", variable)] if "{item}" in key else _tracked(key)
    return keys


def render_dvc_yaml() -> str:
    """dvc.yaml with each stage's ``*.py`` deps set to its import closure (other deps kept, in place) and its
    ``params`` to :func:`stage_params`: ``python tests/test_dvc_deps.py`` writes it after imports or PARAMS change."""
    import re

    text = (ROOT / "dvc.yaml").read_text().splitlines(keepends=True)
    stages = yaml.safe_load("".join(text))["stages"]
    out, current, i = [], None, 0
    while i < len(text):
        line = text[i]
        if match := re.match(r"^  ([a-z_]+):", line):
            current = match.group(1)
        block = re.match(r"^( +)(deps|params):(.*)$", line) if current else None
        if block is None:
            out.append(line)
            i += 1
            continue
        indent, kind, rest = block.group(1), block.group(2), block.group(3).strip()
        stage = stages[current].get("do", stages[current])
        i += 1
        items = []
        if not rest:  # a block list: consume its items
            while i < len(text) and text[i].startswith(indent + "  - "):
                items.append(text[i].strip()[2:])
                i += 1
        if kind == "deps":
            items = [d for d in items if not d.endswith(".py")] + sorted(import_closure(ROOT, stage_module(stage["cmd"])))
        else:
            items = stage_params(stage)
        out.append(f"{indent}{kind}:\n")
        out.extend(f"{indent}  - {item}\n" for item in items)
    return "".join(out)


def test_dvc_yaml_is_written_from_the_code():
    """Code deps and tracked params in dvc.yaml are exactly what the code says (closures, PARAMS)."""
    sys.path.insert(0, str(ROOT))
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), \
        "dvc.yaml is stale: run `python tests/test_dvc_deps.py` and review the diff"


def test_tracked_params_exist_and_skip_how_to_run():
    """Every key dvc.yaml tracks is in params.yaml (DVC fails otherwise), and none is a how-to-run field."""
    from pipeline.core.config import load_params, what_to_compute

    tree = load_params(ROOT / "params.yaml").model_dump(mode="json")
    compute = set(what_to_compute())
    for name, stage in _definitions():
        for key in stage["params"]:
            if "${" in key:
                continue
            node = tree
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key!r} not in params.yaml"
                node = node[part]
            assert any(k == key or k.startswith(key + ".") for k in compute), f"{name}: {key!r} is how-to-run"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    (ROOT / "dvc.yaml").write_text(render_dvc_yaml())


def test_generation_settings_match_params():
    """dvc.yaml's ``generation`` names settings params.yaml defines, with their generator, trained by a
    train_pixel instance, and the RDM as the extra input exactly when the setting samples RDM reps."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    generation = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["generation"]
    for name, entry in generation.items():
        setting = params["sample"]["settings"][name]
        assert entry["generator"] == setting["generator"] in params["pixel"]["conditionings"], name
        assert entry["needs"] == ("models/rdm.pt" if setting["reps"] == "rdm" else "reps.zarr"), name
    assert {"rcg", "rcg_cfg", "baseline", "oracle"} <= set(generation)
