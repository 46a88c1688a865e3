"""The rcg command: every stage listed, one clear line and exit 2 on bad input, tracebacks only with --debug."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import micro_params
from pipeline.core.config import dump_yaml

RCG = [sys.executable, "-m", "stages.cli"]
ENV = {**os.environ, "RCG_PROGRESS": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
STAGES = ["shard", "pretrain-encoder", "encode", "train-rdm", "train-tokenizer", "eval-tokenizer", "tokenize"]


def rcg(*args, cwd=None):
    return subprocess.run([*RCG, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def test_help_lists_every_stage():
    out = rcg("--help").stdout
    for name in STAGES + ["info", "preset"]:
        assert name in out


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(dump_yaml(micro_params(tmp_path)))
    res = rcg("shard", "-p", str(params), "--set", "shard.workers=-1")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "rcg shard: error: invalid params: shard.workers: Input should be greater than or equal to 0"]
    res = rcg("shard", "-p", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "params file not found" in res.stderr and "Traceback" not in res.stderr
    res = rcg("encode", "-p", str(params), "--set", "views.crop=1000")
    assert res.returncode == 2 and "views.crop" in res.stderr
    res = rcg("shard", "-p", str(params), "--set", "shard.workers=-1", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_shard_then_info(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(dump_yaml(micro_params(Path("."))))
    res = rcg("shard", "-p", str(params), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["output"] == "data/shards" and summary["splits"]["train"]["accepted"] == 48
    info = json.loads(rcg("info", str(tmp_path / "data/shards")).stdout)
    assert info["kind"] == "shards" and info["images"] == 64 and info["classes"] == 10
    info = json.loads(rcg("info", str(tmp_path / "data/shards/index.parquet")).stdout)
    assert info["rows"] == 64 and "offset" in info["columns"]
    res = rcg("info", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such file" in res.stderr


def test_info_on_model_files_and_foreign_checkpoints(tmp_path):
    import torch
    from pipeline.core.artifacts import save_model_file
    save_model_file(tmp_path / "m.pt", "rcg-test", {"model": {"width": 2}}, {"w": torch.zeros(2, 3)})
    info = json.loads(rcg("info", str(tmp_path / "m.pt")).stdout)
    assert (info["format"], info["parameters"], info["config"]) == ("rcg-test", 6, {"model": {"width": 2}})
    torch.save({"state_dict": {"a": torch.ones(1)}}, tmp_path / "other.pth")
    info = json.loads(rcg("info", str(tmp_path / "other.pth")).stdout)
    assert info["top_level"] == ["state_dict"]


def test_preset_writes_a_full_params_file(tmp_path):
    out = tmp_path / "p.yaml"
    res = rcg("preset", "cifar10", "--out", str(out))
    assert res.returncode == 0, res.stderr
    tree = yaml.safe_load(out.read_text())
    assert tree["data"]["folder"] == "cifar10/train" and "rdm" in tree and "runtime" in tree
    assert rcg("preset", "nope").returncode == 2


def test_preset_folder_with_sets_writes_valid_params(tmp_path):
    """The recipe's first command: the folder preset, the user's folder set, validated before it is written."""
    out = tmp_path / "params.yaml"
    sets = ["--set", "data.folder=/my/images", "--set", "sample.num_samples=1000"]
    res = rcg("preset", "folder", "--out", str(out), *sets)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.startswith(f"# written by `rcg preset folder {' '.join(sets)}`")
    tree = yaml.safe_load(text)
    assert (tree["data"]["folder"], tree["data"]["labels"]) == ("/my/images", "none")
    assert tree["sample"]["num_samples"] == 1000
    assert tree["score"]["label_spaces"] == [] and "judge" not in tree["score"]["spaces"]
    bad = rcg("preset", "folder", "--out", str(tmp_path / "bad.yaml"), "--set", "score.spaces=[judge]")
    assert bad.returncode == 2 and "score.label_spaces" in bad.stderr and not (tmp_path / "bad.yaml").exists()
