"""Distributed runs: the backend follows the device, the group ends with the stage, dropout draws per rank and
step, a run resumes on another world size, and ``runtime.launcher`` runs a stage under torchrun."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import yaml
from typer.testing import CliRunner

from conftest import micro_params
from pipeline.core import distributed
from pipeline.core.artifacts import load_checkpoint, load_model_file
from pipeline.core.config import Runtime, dump_yaml, what_to_compute
from pipeline.core.errors import RcgError
from pipeline.train.loop import TrainLoop
from stages import cli, train_rdm
from test_train_rdm import make_store, read_curve

ROOT = Path(__file__).resolve().parents[1]
CPU = ["runtime.device=cpu", "runtime.threads=1"]
DROPOUT = CPU + ["rdm.model.dropout=0.2", "rdm.eval.num_samples=8", "rdm.sample.steps=2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(rank: int, port: int) -> None:
    """Be rank ``rank`` of 2, as torchrun would set it up."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def two_ranks(worker, *args) -> None:
    mp.start_processes(worker, args=(free_port(), *args), nprocs=2, start_method="fork")


def write_params(root: Path, overrides: list[str]) -> Path:
    path = root / "params.yaml"
    path.write_text(dump_yaml(micro_params(root, overrides)))
    return path


# ----------------------------------------------------------------------------------------------- backend
def test_backend_follows_the_device_the_stage_uses_not_cuda_availability(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "_barrier_group", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: calls.append(("group", backend, timeout)) or "g")
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)

    d = distributed.init(Runtime(device="cpu", barrier_timeout_minutes=7))
    assert calls == [("gloo", timedelta(minutes=7))]  # gloo's one group carries the barriers: their timeout
    assert (d.rank, d.world, d.local_rank, d.barrier_group) == (1, 2, 1, None)

    calls.clear()
    d = distributed.init(Runtime(device="auto", barrier_timeout_minutes=7))
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", None), ("group", "gloo", timedelta(minutes=7))]
    assert d.barrier_group == "g"  # barriers wait on a CPU group, out of NCCL's watchdog


def _stage_worker(rank: int, port: int, root: str, fails: bool) -> None:
    """``rcg compare`` as rank ``rank``, its module replaced by one that joins the group, waits at a barrier and
    returns (or fails); the file written afterwards says whether a process group is left."""
    join(rank, port)

    def run(params):
        d = distributed.init(params.runtime)
        d.barrier()
        if fails:
            raise RcgError("the stage failed")
        return {"rank": d.rank}

    sys.modules["stages.compare"] = types.SimpleNamespace(run=run)
    try:
        cli.run_stage("compare", Path(root) / "params.yaml", [], debug=False)
    except Exception as exc:  # the CLI's exit (code 2) on the stage's error
        assert fails and getattr(exc, "exit_code", None) == 2, exc
    (Path(root) / f"rank{rank}.json").write_text(json.dumps({"initialized": dist.is_initialized()}))


@pytest.mark.integration
@pytest.mark.parametrize("fails", [False, True])
def test_the_cli_destroys_the_process_group_when_a_stage_ends(tmp_path, fails):
    write_params(tmp_path, CPU)
    two_ranks(_stage_worker, str(tmp_path), fails)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"initialized": False}


# ----------------------------------------------------------------------------------------------- dropout
def record_dropout(masks: list) -> None:
    """Record every training-time dropout mask (the positions zeroed) into ``masks``."""
    forward = nn.Dropout.forward

    def recording(self, x):
        out = forward(self, x)
        if self.training and torch.is_grad_enabled():
            masks.append(((out == 0) & (x != 0)).clone())
        return out

    nn.Dropout.forward = recording


def _dropout_worker(rank: int, port: int, root: str) -> None:
    join(rank, port)
    masks = []
    record_dropout(masks)
    train_rdm.run(micro_params(Path(root), DROPOUT))
    torch.save(masks, Path(root) / f"masks{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.integration
def test_dropout_masks_differ_across_ranks_and_repeat_run_to_run(tmp_path):
    """Two gloo ranks train the RDM with dropout twice: each rank draws its own masks, the same in both runs,
    and the two runs end with the same weights."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for root in runs:
        make_store(root)
        two_ranks(_dropout_worker, str(root))
    masks = [[torch.load(root / f"masks{rank}.pt", weights_only=True) for rank in (0, 1)] for root in runs]
    steps, blocks = 20, micro_params(tmp_path).rdm.model.num_res_blocks
    assert len(masks[0][0]) == len(masks[0][1]) == steps * blocks
    for rank in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(masks[0][rank], masks[1][rank]))
    assert not any(torch.equal(a, b) for a, b in zip(masks[0][0], masks[0][1]))
    a, b = (load_model_file(root / "data" / "models" / "rdm.pt", "rcg-rdm") for root in runs)
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_a_resumed_iteration_draws_the_masks_of_the_uninterrupted_one(tmp_path):
    """Dropout is seeded per iteration, so the masks after a resume are those an unbroken run draws."""
    def train(root: Path, stop_at: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        loop = TrainLoop("toy", micro_params(root), distributed.Dist(), torch.device("cpu"), steps=6, identity={},
                         modules={"model": model}, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         log_every=1, checkpoint_every=2, samples_per_step=8)
        masks = []

        def step(batch, it):
            if it == stop_at:
                raise KeyboardInterrupt
            hidden = model[0](batch)
            out = model[1](hidden)
            masks.append((out == 0) & (hidden != 0))
            return {"loss": model[2](out).pow(2).mean()}

        with pytest.raises(KeyboardInterrupt) if stop_at is not None else contextlib.nullcontext():
            loop.run(step, (torch.ones(8, 4) for _ in range(loop.start, 6)))
        return masks

    whole = train(tmp_path / "whole", None)
    train(tmp_path / "killed", 3)  # the state at step 2
    resumed = train(tmp_path / "killed", None)
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(whole[2:], resumed))


# ------------------------------------------------------------------------------------- another world size
RESUME = CPU + ["rdm.eval.num_samples=8", "rdm.sample.steps=2"]  # 20 steps, a checkpoint every 10


def stop_at_iteration(stop: int, patch=setattr) -> None:
    """Make training stop (like a kill) when it reaches iteration ``stop``, after the checkpoint before it
    (``patch``: monkeypatch.setattr in the test's own process)."""
    backward_step = TrainLoop._backward_step

    def step(self, step_fn, batch, it):
        if it == stop:
            raise KeyboardInterrupt("simulated kill")
        return backward_step(self, step_fn, batch, it)

    patch(TrainLoop, "_backward_step", step)


def _killed_worker(rank: int, port: int, root: str) -> None:
    join(rank, port)
    stop_at_iteration(12)
    with pytest.raises(KeyboardInterrupt):
        train_rdm.run(micro_params(Path(root), RESUME))
    dist.destroy_process_group()


@pytest.mark.integration
def test_a_run_killed_on_two_ranks_resumes_on_one(tmp_path):
    make_store(tmp_path)
    two_ranks(_killed_worker, str(tmp_path))
    assert load_checkpoint(tmp_path / "data" / "state" / "train_rdm.pt")["step"] == 10
    summary = train_rdm.run(micro_params(tmp_path, RESUME))
    assert (summary["resumed_from"], summary["steps"], summary["world"]) == (10, 20, 1)
    assert [int(r["step"]) for r in read_curve(tmp_path)] == [5, 10, 15, 20]


# ------------------------------------------------------------------------------------------------ launcher
def test_launch_command_reruns_the_same_stage_command_under_the_launcher():
    argv = cli.launch_command("torchrun --nproc-per-node 8", "train_pixel", "rep", Path("p.yaml"),
                              ["pixel.train.steps=3", "seed=1"], debug=True)
    assert argv == ["torchrun", "--nproc-per-node", "8", "-m", "stages.cli", "train-pixel", "rep", "--params", "p.yaml",
                    "--set", "pixel.train.steps=3", "--set", "seed=1", "--debug"]


def test_only_a_distributed_stage_outside_torchrun_that_is_no_import_is_relaunched(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(cli.os, "execvpe", lambda file, argv, env: launched.append((file, argv, env[cli.LAUNCHED])))
    for key in ("WORLD_SIZE", cli.LAUNCHED):
        monkeypatch.delenv(key, raising=False)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    params = micro_params(tmp_path, [f"runtime.launcher={torchrun} --nproc-per-node 2"])
    cli._relaunch("train_rdm", params, None, Path("p.yaml"), [], False)
    assert launched == [(torchrun, cli.launch_command(params.runtime.launcher, "train_rdm", None, Path("p.yaml"), [],
                                                      False), "1")]
    launched.clear()
    cli._relaunch("score", params, "rcg", Path("p.yaml"), [], False)  # one process's work
    imports = micro_params(tmp_path, [f"runtime.launcher={torchrun}", "rdm.checkpoint=official.pth"])
    cli._relaunch("train_rdm", imports, None, Path("p.yaml"), [], False)  # an import: rank 0's work alone
    pixel = micro_params(tmp_path, [f"runtime.launcher={torchrun}", "pixel.checkpoints.rep=official.pth"])
    cli._relaunch("train_pixel", pixel, "rep", Path("p.yaml"), [], False)
    assert launched == []
    cli._relaunch("train_pixel", pixel, "none", Path("p.yaml"), [], False)  # trained: the rep file is not its own
    assert [argv[-3:] for _, argv, _ in launched] == [["none", "--params", "p.yaml"]]
    launched.clear()
    cli._relaunch("train_rdm", micro_params(tmp_path), None, Path("p.yaml"), [], False)  # no launcher
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli._relaunch("train_rdm", params, None, Path("p.yaml"), [], False)  # already under torchrun
    assert launched == []


def test_the_launcher_is_how_to_run_and_a_missing_one_is_one_line(tmp_path):
    assert not [key for key in what_to_compute() if key.startswith("runtime")]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    tracked = [key for stage in stages for key in stage.get("do", stage).get("params", [])]
    assert tracked and not [key for key in tracked if str(key).startswith("runtime")]  # changing it reruns nothing
    path = write_params(tmp_path, CPU + ["runtime.launcher=no-such-launcher --nproc-per-node 2"])
    result = CliRunner().invoke(cli.app, ["train-rdm", "--params", str(path)])
    assert result.exit_code == 2
    assert "runtime.launcher: 'no-such-launcher' is not on PATH" in result.output


@pytest.mark.integration
def test_rcg_runs_a_stage_under_torchrun_and_resumes_a_one_process_run_on_two(tmp_path, monkeypatch):
    """``rcg train-rdm`` with ``runtime.launcher`` set becomes torchrun with two gloo ranks; it continues the
    state a one-process run left at step 10 and ends at step 20."""
    make_store(tmp_path)
    with monkeypatch.context() as patch:
        stop_at_iteration(12, patch.setattr)
        with pytest.raises(KeyboardInterrupt):
            train_rdm.run(micro_params(tmp_path, RESUME))
    torchrun = Path(sys.executable).parent / "torchrun"
    path = write_params(tmp_path, RESUME + [f"runtime.launcher={torchrun} --standalone --nproc-per-node 2"])
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "stages.cli", "train-rdm", "--params", str(path)], cwd=ROOT,
                          env={**env, "RCG_PROGRESS": "0", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "running under" in done.stderr and "--nproc-per-node 2" in done.stderr
    summary = load_model_file(tmp_path / "data" / "models" / "rdm.pt", "rcg-rdm")["summary"]
    assert (summary["resumed_from"], summary["steps"], summary["world"]) == (10, 20, 2)
    assert [int(r["step"]) for r in read_curve(tmp_path)] == [5, 10, 15, 20]
