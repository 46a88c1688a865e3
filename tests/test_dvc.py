"""The real `dvc repro` on the micro preset: every stage runs, a rerun is a no-op, a param change reruns
only the stages that depend on it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import micro_params
from pipeline.core.config import dump_yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RCG_PROGRESS": "0",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd)}
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _project(tmp_path: Path) -> Path:
    """A copy of the pipeline's code and dvc.yaml with micro params (artifacts at data/, metrics/)."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ["pipeline", "stages"]:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    (tmp_path / "params.yaml").write_text(dump_yaml(micro_params(Path("."))))
    _dvc(tmp_path, "init", "--no-scm", "-q")
    return tmp_path


def test_dvc_repro_micro(tmp_path):
    proj = _project(tmp_path)
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    out = _dvc(proj, "repro")
    for stage in stages:
        assert f"Running stage '{stage}'" in out
    for artifact in ["data/shards/index.parquet", "data/models/encoder.pt", "data/reps.zarr/zarr.json",
                     "data/models/rdm.pt", "data/models/tokenizer.pt", "data/tokens.zarr/zarr.json",
                     "metrics/encoder.json", "metrics/rdm.json", "metrics/tokenizer.json"]:
        assert (proj / artifact).exists(), artifact
    assert "Running stage" not in _dvc(proj, "repro")  # everything cached

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["rdm"]["train"]["steps"] += 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = _dvc(proj, "repro")
    assert [s for s in stages if f"Running stage '{s}'" in out] == ["train_rdm"]

    metrics = json.loads(_dvc(proj, "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert "metrics/rdm.json" in shown and "metrics/encoder.json" in shown and "metrics/tokenizer.json" in shown
