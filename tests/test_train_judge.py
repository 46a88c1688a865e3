"""train_judge streams its images: a step decodes its own batch only, and a killed run resumes bit-identical."""

import pytest
import torch

from conftest import micro_params
from pipeline.core.artifacts import load_checkpoint, load_model_file
from pipeline.data.shards import ShardSet
import pipeline.train.judge as recipe
from stages import train_judge

JUDGE = ["judge.train.epochs=2", "judge.train.batch_size=16", "judge.train.checkpoint_every=2"]


def test_a_step_decodes_its_batch_not_the_split(workspace, monkeypatch):
    """Holding the split in memory (~250 GB at ImageNet 256 px) would decode all 48 images before step 0."""
    reads, at_step = [0], []
    real_read, real_augment = ShardSet.read, recipe.augment

    def read(self, idx):
        reads[0] += 1
        return real_read(self, idx)

    def augment(x, gen):
        at_step.append(reads[0])
        return real_augment(x, gen)

    monkeypatch.setattr(ShardSet, "read", read)
    monkeypatch.setattr(recipe, "augment", augment)
    train_judge.run(micro_params(workspace, JUDGE))
    assert at_step == [16, 32, 48, 64, 80, 96]  # 6 steps of 16: each one's own images, decoded on the way


def test_killed_run_resumes_to_the_same_weights(tmp_path, micro_shards, monkeypatch):
    import shutil
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        shutil.copytree(micro_shards, root / "data" / "shards")
    train_judge.run(micro_params(whole, JUDGE))

    calls, real_augment = [0], recipe.augment

    def die_at_step_3(x, gen):
        if calls[0] == 3:  # the 4th step: after the checkpoint at step 2
            raise KeyboardInterrupt
        calls[0] += 1
        return real_augment(x, gen)

    monkeypatch.setattr(recipe, "augment", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_judge.run(micro_params(killed, JUDGE))
    assert load_checkpoint(killed / "data" / "state" / "train_judge.pt")["step"] == 2
    monkeypatch.setattr(recipe, "augment", real_augment)
    assert train_judge.run(micro_params(killed, JUDGE + ["judge.train.workers=2"]))["output"]  # another worker count
    a = load_model_file(whole / "data" / "models" / "judge.pt", "rcg-judge")["state_dict"]
    b = load_model_file(killed / "data" / "models" / "judge.pt", "rcg-judge")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
