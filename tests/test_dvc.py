"""The real `dvc repro` on the micro preset: every stage runs, a rerun is a no-op, a param change reruns
only the stages that depend on it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import micro_params
from test_metrics_files import problems
from pipeline.core.config import dump_yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _dvc(cwd: Path, *args: str, timeout: int = 900) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RCG_PROGRESS": "0",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd),
           **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")  # dvc exp commits without a git config
              for what, value in (("NAME", "test"), ("EMAIL", "test@example.com"))}}
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _project(tmp_path: Path, overrides: list[str] = ()) -> Path:
    """A git repo holding a copy of the pipeline's code and dvc.yaml with micro params (artifacts at data/,
    metrics/; ``overrides`` as ``--set`` gives them), so that ``dvc exp`` works in it too."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ["pipeline", "stages"]:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    (tmp_path / "params.yaml").write_text(dump_yaml(micro_params(Path("."), overrides)))
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    _dvc(tmp_path, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")  # the repository's cache link type
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "micro project"], cwd=tmp_path, check=True)
    return tmp_path


def _ran(out: str) -> set[str]:
    """Stage instances that ran (``train_pixel@rep``, ...), from dvc's output."""
    return set(re.findall(r"Running stage '([^']+)'", out))


def _check_tokenizer_ceiling(proj: Path) -> None:
    """bench.tokenizer_ceiling in a finished project: the real row's images, through the tokenizer, scored in the
    real row's spaces (other figures than the real row's: the images changed on the way)."""
    env = {**os.environ, "RCG_PROGRESS": "0", "PYTHONPATH": f"{proj}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-m", "bench.tokenizer_ceiling"], cwd=proj, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ceiling = json.loads(res.stdout)
    real = json.loads((proj / "metrics" / "score" / "real.json").read_text())
    figures = {f"{s}_{k}": v[k] for s, v in real.items() if isinstance(v, dict) for k in ("fid", "fd", "isc") if k in v}
    assert ceiling["num_samples"] == real["num_samples"]
    assert set(ceiling) - {"num_samples"} == set(figures), (ceiling, figures)
    assert all(ceiling[k] != figures[k] for k in figures), (ceiling, figures)


def test_dvc_repro_micro(tmp_path):
    """The whole pipeline runs, a rerun is a no-op, and an RDM experiment reruns the RDM and what samples from
    it (the two RCG settings, their scores, the table), reusing the shards, both stores and the pixel generators."""
    proj = _project(tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    out = _dvc(proj, "repro")
    settings = list(yaml.safe_load((proj / "dvc.yaml").read_text())["vars"][0]["generation"])
    instances = ({"scan", "shard", "pretrain_encoder", "encode", "train_rdm", "train_tokenizer", "eval_tokenizer", "tokenize",
                  "score_real", "compare"}
                 | {f"train_judge@{s}" for s in params["score"]["label_spaces"]}
                 | {f"train_ssl_judge@{s}" for s in params["score"]["ssl_spaces"]}
                 | {f"reference@{s}" for s in params["score"]["spaces"]}
                 | {f"train_pixel@{c}" for c in params["pixel"]["conditionings"]}
                 | {f"{stage}@{s}" for stage in ("sample", "score") for s in settings})
    assert _ran(out) == instances
    assert "| rcg |" in out and "| baseline |" in out  # the comparison table ends the run
    for artifact in ["data/shards/index.parquet", "data/models/encoder.pt", "data/reps.zarr/zarr.json",
                     "data/models/rdm.pt", "data/models/tokenizer.pt", "data/tokens.zarr/zarr.json",
                     "data/models/pixel-rep.pt", "data/samples/rcg.zarr/zarr.json", "metrics/figures/rcg/samples.png",
                     "metrics/encoder.json", "metrics/rdm.json", "metrics/tokenizer.json", "metrics/score/rcg.json",
                     "metrics/compare.md"]:
        assert (proj / artifact).exists(), artifact
    for path in sorted((proj / "metrics").rglob("*.json")):  # every metrics file is a row of a table
        assert not problems(json.loads(path.read_text())), (path.name, problems(json.loads(path.read_text())))
    assert _ran(_dvc(proj, "repro")) == {"scan"}  # everything cached; the folder listing is checked every time
    _check_tokenizer_ceiling(proj)
    for output in ["data/shards/index.parquet", "data/models/rdm.pt", "data/samples/rcg.zarr/zarr.json"]:
        path = proj / output  # file and folder outputs are links into .dvc/cache, not second copies (.dvc/config)
        assert path.is_symlink() or path.stat().st_nlink > 1, f"{output} is a copy of its cache entry"
    subprocess.run(["git", "add", "-A"], cwd=proj, check=True)  # dvc.lock and the .gitignore entries dvc wrote
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "run"],
                   cwd=proj, check=True)

    out = _dvc(proj, "exp", "run", "-S", f"rdm.train.steps={params['rdm']['train']['steps'] + 2}")
    assert _ran(out) == {"scan", "train_rdm", "sample@rcg", "sample@rcg_cfg", "score@rcg", "score@rcg_cfg", "compare"}
    table = json.loads(_dvc(proj, "exp", "show", "--json"))
    shown = json.dumps(table)
    for metrics in ["metrics/rdm.json", "metrics/encoder.json", "metrics/tokenizer.json", "metrics/compare.json",
                    "metrics/score/rcg.json"]:
        assert metrics in shown, metrics
