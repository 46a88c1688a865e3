"""Each stage checks the files it reads, in one line naming the key, before any work; no stage checks files it
never reads (``rcg shard`` runs while the checkpoints are still downloading)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pipeline.core.config import dump_yaml
from pipeline.core.errors import RcgError
from pipeline.data.shards import ShardSet
from stages import pretrain_encoder, reference, score, shard, train_pixel, train_rdm, train_tokenizer
from stages.cli import app
from conftest import micro_params

MISSING_CHECKPOINTS = ["encoder.checkpoint", "rdm.checkpoint", "tokenizer.checkpoint", "pixel.checkpoints.rep",
                       "pixel.checkpoints.none", "score.inception_weights", "score.dinov2_weights"]


def test_shard_runs_while_the_checkpoints_are_missing(tmp_path):
    """``rcg shard --params FILE`` with every checkpoint and weights file still absent."""
    params = micro_params(tmp_path, [f"{key}={tmp_path / 'downloading' / 'file.pth'}" for key in MISSING_CHECKPOINTS]
                          + [f"score.reference_npz.inception={tmp_path / 'downloading' / 'adm.npz'}"])
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(params))
    res = CliRunner().invoke(app, ["shard", "--params", str(path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["splits"]["train"]["accepted"] == 48
    assert len(ShardSet(params.paths.shards, "train")) == 48


@pytest.mark.parametrize("key, run", [
    ("encoder.checkpoint", pretrain_encoder.run),
    ("rdm.checkpoint", train_rdm.run),
    ("tokenizer.checkpoint", train_tokenizer.run),
    ("pixel.checkpoints.rep", lambda p: train_pixel.run(p, "rep")),
    ("pixel.checkpoints.none", lambda p: train_pixel.run(p, "none")),
    ("score.inception_weights", lambda p: reference.run(p, "inception")),
    ("score.inception_weights", lambda p: score.run(p, "rcg")),
    ("score.dinov2_weights", lambda p: reference.run(p, "dinov2")),
    ("score.dinov2_weights", lambda p: score.run(p, "rcg")),
])
def test_a_stage_checks_the_file_it_reads_first(tmp_path, key, run):
    """No shards, stores or models exist here: only a check made before any work can name the key."""
    missing = tmp_path / "missing.pth"
    with pytest.raises(RcgError, match=f"^{re.escape(f'{key}: file does not exist: {missing}')}$"):
        run(micro_params(tmp_path, [f"{key}={missing}"]))
    assert not (tmp_path / "data").exists()


def test_score_checks_a_reference_npz_first(tmp_path):
    missing = tmp_path / "adm.npz"
    with pytest.raises(RcgError, match=f"^{re.escape(f'score.reference_npz.judge: file does not exist: {missing}')}$"):
        score.run(micro_params(tmp_path, [f"score.reference_npz.judge={missing}"]), "rcg")


def test_shard_checks_the_folders_it_reads(tmp_path):
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={tmp_path / 'imagenet' / 'train'}"])
    with pytest.raises(RcgError, match=re.escape(f"data.folder: folder does not exist: {tmp_path}/imagenet/train")):
        shard.run(params)
    (tmp_path / "train").mkdir()
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={tmp_path / 'train'}",
                                     f"data.val_folder={tmp_path / 'val'}"])
    with pytest.raises(RcgError, match="^data.val_folder: folder does not exist"):
        shard.run(params)
    assert not (tmp_path / "data").exists()


def test_cli_names_the_key_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(micro_params(tmp_path, [f"encoder.checkpoint={tmp_path / 'vitb.pth.tar'}"])))
    res = CliRunner().invoke(app, ["pretrain-encoder", "--params", str(path)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"rcg pretrain-encoder: error: encoder.checkpoint: file does not exist: {tmp_path / 'vitb.pth.tar'}"]
