"""Real kills: a stage run as the CLI in a subprocess, SIGKILLed mid-run, then rerun, ends bit-identical to an
uninterrupted run (train_rdm: model file weights and curves; encode: the store). The uninterrupted run is the same
stage function in this process (one torch thread in both)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import micro_params
from pipeline.core.artifacts import load_checkpoint, load_model_file, save_model_file
from pipeline.core.config import dump_yaml
from pipeline.data.stores import partial_path
from pipeline.models.encoder import MODEL_FORMAT, build_encoder
from stages import encode, shard, train_rdm
from test_train_rdm import make_store

ROOT = Path(__file__).resolve().parents[1]
RDM = ["rdm.train.steps=600", "rdm.train.checkpoint_every=100", "rdm.train.log_every=10",
       "rdm.eval.num_samples=8", "rdm.sample.steps=2", "runtime.threads=1"]


def cli(stage: str, params, log: Path) -> subprocess.Popen:
    """``rcg <stage> --params FILE`` as a separate process (its own interpreter, nothing shared with the test)."""
    path = params.paths.data.parent / "params.yaml"
    path.write_text(dump_yaml(params))
    env = {**os.environ, "RCG_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "stages.cli", stage, "--params", str(path)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 5 ms); fail if it ends first."""
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < end, "timed out waiting to kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_killed_train_rdm_resumes_bit_identical(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        make_store(root)
    train_rdm.run(micro_params(whole, RDM))

    target = random.Random().randrange(110, 500, 10)  # a logged step after the first checkpoint (100)
    curve = killed / "metrics" / "plots" / "train_rdm.csv"

    def past_target() -> bool:
        return curve.is_file() and curve.read_text().count("\n") - 1 >= target // 10

    kill_when(cli("train-rdm", micro_params(killed, RDM), killed / "log"), past_target, killed / "log")
    state = load_checkpoint(killed / "data" / "state" / "train_rdm.pt")
    assert 100 <= state["step"] < 600, f"killed at ~{target}"
    assert not (killed / "data" / "models" / "rdm.pt").exists()
    finish(cli("train-rdm", micro_params(killed, RDM), killed / "log"), killed / "log")

    a = load_model_file(whole / "data" / "models" / "rdm.pt", "rcg-rdm")
    b = load_model_file(killed / "data" / "models" / "rdm.pt", "rcg-rdm")
    assert b["summary"]["resumed_from"] == state["step"]
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"killed at ~{target}"
    assert curve.read_text() == (whole / "metrics" / "plots" / "train_rdm.csv").read_text()


ENCODE = ["data.builtin.num_train=600", "data.builtin.num_val=0", "encode.chunk_size=50", "encode.batch_size=10",
          "encode.knn_images=50", "runtime.threads=1",
          "encoder.model.depth=4", "encoder.model.embed_dim=64", "encoder.model.proj_hidden_dim=256"]


def test_killed_encode_resumes_bit_identical(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    params = micro_params(whole, ENCODE)
    shard.run(params)
    torch.manual_seed(0)
    config = params.encoder.model.model_dump()
    save_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT, {"model": config},
                    build_encoder(config).state_dict(), summary={"source": "test"})
    shutil.copytree(whole / "data", killed / "data")
    encode.run(params)

    params = micro_params(killed, ENCODE)
    done_dir = partial_path(params.paths.reps) / "done" / "c"
    chunks = random.Random().randrange(1, 9)  # of 12

    def chunks_done() -> bool:
        return done_dir.is_dir() and len(os.listdir(done_dir)) >= chunks

    kill_when(cli("encode", params, killed / "log"), chunks_done, killed / "log")
    done = zarr.open_array(str(partial_path(params.paths.reps) / "done"), mode="r")[:]
    assert 0 < done.sum() < len(done) and not params.paths.reps.exists(), f"killed after {chunks} chunks"
    finish(cli("encode", params, killed / "log"), killed / "log")

    a, b = (zarr.open_group(str(root / "data" / "reps.zarr"), mode="r") for root in (whole, killed))
    assert np.asarray(a["reps"][:]).tobytes() == np.asarray(b["reps"][:]).tobytes()
    assert np.array_equal(a["labels"][:], b["labels"][:])
    assert a.attrs["identity"] == b.attrs["identity"]
