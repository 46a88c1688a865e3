"""The shared training loop on a toy regression: accumulation, clipping, EMA, the deferred NaN check, resume of
weights and curves, param groups, schedules, resume identities and the summary schema."""

import copy
import csv
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import micro_params
from pipeline.core.artifacts import load_checkpoint
from pipeline.core import distributed, runtime
from pipeline.core.config import what_to_compute
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.models.ema import EMA
from pipeline.train.identity import resume_identity
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.core.rng import seeded_generator, stream_seed
from pipeline.train.schedules import warmup_constant, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")
W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


def data(it: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration ``it``'s batch, a pure function of it."""
    g = seeded_generator(CPU, 0, it)
    x = torch.randn(n, 4, generator=g)
    return x, x @ W_TRUE.T + 0.1 * torch.randn(n, 1, generator=g)


def make(tmp_path, steps=6, accum=1, nan_at=None, ema_decay=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, max_decay=ema_decay, warmup=False) if ema_decay else None
    loop = TrainLoop("toy", micro_params(tmp_path), Dist(), CPU, steps=steps, identity={"toy": 1},
                     modules={"model": model}, optimizer=opt, accum=accum, samples_per_step=8, ema=ema,
                     ema_model=model if ema else None, **{"log_every": 2, "checkpoint_every": 3, **kw})

    def step(batch, it):
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        return {"loss": loss * float("nan") if it == nan_at else loss, "scale": 2.0}

    def batches():
        for it in range(loop.start, steps):
            x, y = data(it)
            yield [(x[:4], y[:4]), (x[4:], y[4:])] if accum == 2 else (x, y)

    return loop, model, step, batches


def curve(tmp_path) -> list[dict]:
    with open(tmp_path / "metrics" / "plots" / "toy.csv") as f:
        return list(csv.DictReader(f))


def test_summary_curve_and_step_numbering(tmp_path):
    loop, model, step, batches = make(tmp_path, lr=warmup_cosine(0.1, 6, 2))
    seen = []
    summary = loop.run(lambda b, it: seen.append(it) or step(b, it), batches())
    assert seen == list(range(6))
    assert set(summary) == {"steps", "resumed_from", "seconds", "samples_per_s", "final_loss"}
    assert summary["steps"] == 6 and summary["resumed_from"] == 0 and summary["samples_per_s"] > 0
    rows = curve(tmp_path)
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and list(rows[0]) == ["step", "loss", "scale", "lr"]
    assert float(rows[0]["lr"]) == pytest.approx(0.05)  # iteration 1 of a 2-iteration warm-up
    assert summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-3)
    assert load_checkpoint(tmp_path / "data" / "state" / "toy.pt")["step"] == 6


def test_resume_is_exact_for_weights_and_curves(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    loop, model, step, batches = make(whole)
    loop.run(step, batches())
    want = model.weight.detach().clone()

    loop, model, step, batches = make(killed)

    def dies_at_4(b, it):
        if it == 4:
            raise KeyboardInterrupt
        return step(b, it)

    with pytest.raises(KeyboardInterrupt):
        loop.run(dies_at_4, batches())
    loop, model, step, batches = make(killed)  # a new process: the state at step 3, the window of step 3
    assert loop.start == 3
    assert loop.run(step, batches())["resumed_from"] == 3
    assert torch.equal(model.weight, want)
    assert curve(killed) == curve(whole)  # step 4 averages iterations 2 and 3 across the kill


def test_curves_come_back_after_dvc_deletes_them(tmp_path):
    """``dvc repro`` deletes a stage's outputs before rerunning it: a run resumed after a kill, and a run that
    finds its state already at the last step, still write the whole curve (from the state, not the old file)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    loop, model, step, batches = make(whole)
    loop.run(step, batches())
    want = curve(whole)
    (whole / "metrics" / "plots" / "toy.csv").unlink()
    loop, model, step, batches = make(whole)
    assert loop.start == 6 and loop.run(step, batches())["resumed_from"] == 6
    assert curve(whole) == want

    loop, model, step, batches = make(killed)
    with pytest.raises(KeyboardInterrupt):
        loop.run(lambda b, it: (_ for _ in ()).throw(KeyboardInterrupt) if it == 4 else step(b, it), batches())
    (killed / "metrics" / "plots" / "toy.csv").unlink()
    loop, model, step, batches = make(killed)
    loop.run(step, batches())
    assert curve(killed) == want


def test_accumulation_matches_the_whole_batch(tmp_path):
    loop, whole, step, batches = make(tmp_path / "a")
    loop.run(step, batches())
    loop, micro, step, batches = make(tmp_path / "b", accum=2)
    loop.run(step, batches())
    torch.testing.assert_close(micro.weight, whole.weight)
    with pytest.raises(RcgError, match="brought 1 micro-batches, expected 2"):
        loop, _, step, _ = make(tmp_path / "c", accum=2)
        loop.run(step, [[data(0)]])


def _ddp_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    params = micro_params(Path(root))
    d = distributed.init(params.runtime)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    loop = TrainLoop("toy", params, d, CPU, steps=3, identity={}, modules={"model": model},
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), accum=2, log_every=1,
                     checkpoint_every=3, samples_per_step=8)
    net = loop.wrap(model)

    def step(batch, it):
        x, y = batch
        return {"loss": (net(x) - y).pow(2).mean()}

    def batches():  # rank r: rows [4r, 4r + 4) of the iteration's 8, as two micro-batches of 2
        for it in range(3):
            x, y = (t[4 * rank:4 * rank + 4] for t in data(it))
            yield [(x[:2], y[:2]), (x[2:], y[2:])]

    loop.run(step, batches())
    torch.save(model.state_dict(), Path(root) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_ddp_with_accumulation_matches_one_process(tmp_path):
    """Two gloo ranks x two micro-batches each (no_sync on the first) = one process on the whole batch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path / "ddp")), nprocs=2, start_method="fork")
    loop, model, step, batches = make(tmp_path / "one", steps=3)
    loop.run(step, batches())
    for rank in (0, 1):
        got = torch.load(tmp_path / "ddp" / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["weight"], model.weight.detach())


def test_clipping_and_ema(tmp_path):
    torch.manual_seed(0)
    ref = nn.Linear(4, 1)
    x, y = data(0)
    (ref(x) - y).pow(2).mean().backward()
    norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    assert norm > 0.5
    loop, model, step, batches = make(tmp_path, steps=1, grad_clip=0.5, log_every=1, ema_decay=0.5)
    loop.run(step, batches())
    shadow = loop.ema
    with torch.no_grad():
        expected = ref.weight - 0.1 * ref.weight.grad * (0.5 / (norm + 1e-6))
    torch.testing.assert_close(model.weight, expected)
    assert float(curve(tmp_path)[0]["grad_norm"]) == pytest.approx(norm.item(), rel=1e-5)
    torch.testing.assert_close(shadow.shadow["weight"], 0.5 * ref.weight.detach() + 0.5 * model.weight.detach())


def test_update_steps_one_of_several_optimizers(tmp_path):
    """Without the loop's optimizer a step updates its own through TrainLoop.update: zero_grad, backward, clipping
    (the loop's grad_clip by default, or the call's), step; it returns the norm before clipping."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    ref_a, ref_b = copy.deepcopy(a), copy.deepcopy(b)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    loop = TrainLoop("toy", micro_params(tmp_path), Dist(), CPU, steps=2, identity={"toy": 1},
                     modules={"a": a, "b": b, "opt_a": opt_a, "opt_b": opt_b}, log_every=1, checkpoint_every=2,
                     samples_per_step=8, grad_clip=0.5)
    norms = []

    def step(batch, it):
        x, y = batch
        loss = (a(x) - y).pow(2).mean()
        norms.append(loop.update(opt_a, loss))
        assert loop.update(opt_b, (b(x) - y).pow(2).mean(), clip=None) is None
        return {"loss": loss}

    loop.run(step, (data(it) for it in range(2)))
    ref_opt_a, ref_opt_b = torch.optim.SGD(ref_a.parameters(), lr=0.1), torch.optim.SGD(ref_b.parameters(), lr=0.1)
    for it in range(2):
        x, y = data(it)
        for model, opt, clip in ((ref_a, ref_opt_a, 0.5), (ref_b, ref_opt_b, None)):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            if clip is not None:
                assert torch.equal(torch.nn.utils.clip_grad_norm_(model.parameters(), clip), norms[it])
            opt.step()
    assert norms[0] > 0.5  # the clip acted
    for got, want in ((a, ref_a), (b, ref_b)):
        assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


@pytest.mark.parametrize("nan_at, log_every, saved", [(4, 2, 3), (2, 10, None)])
def test_nan_names_the_first_bad_step_and_keeps_the_last_good_state(tmp_path, nan_at, log_every, saved):
    """Checked once per log interval and before each checkpoint (every 3): the state on disk predates the bad step."""
    loop, model, step, batches = make(tmp_path, nan_at=nan_at, log_every=log_every)
    with pytest.raises(RcgError, match=rf"toy: non-finite loss \(nan\) at step {nan_at + 1}; .*toy\.pt"):
        loop.run(step, batches())
    state = tmp_path / "data" / "state" / "toy.pt"
    assert (load_checkpoint(state)["step"] if state.exists() else None) == saved


def test_batches_that_run_out_are_an_error(tmp_path):
    loop, _, step, _ = make(tmp_path)
    with pytest.raises(RcgError, match="toy: the batches ran out at step 2 of 6"):
        loop.run(step, [data(0), data(1)])


@pytest.mark.parametrize("native", [False, True])
def test_cpu_autocast_follows_native_bf16(tmp_path, monkeypatch, native):
    """bf16 on a CPU only where it is native (AVX512-BF16 / AMX); elsewhere the asked-for bf16 runs exact fp32,
    and a run that did not ask never autocasts."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    loop, model, _, _ = make(tmp_path, bf16=True)
    with loop.autocast():
        assert model(torch.randn(2, 4)).dtype == (torch.bfloat16 if native else torch.float32)
    plain, model, _, _ = make(tmp_path / "plain", bf16=False)
    with plain.autocast():
        assert model(torch.randn(2, 4)).dtype == torch.float32
    assert runtime.precision(True, torch.device("cpu")) == ("bf16" if native else "fp32")


def test_param_groups_spare_biases_and_1d_params():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    no_decay, decay = param_groups(model, 0.05, skip=["0.weight"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["params"] == []  # 0.weight skipped by name, 2.weight frozen
    assert len(no_decay["params"]) == 5  # 0.weight, 0.bias, LayerNorm weight and bias, 2.bias
    no_decay, decay = param_groups(model, 0.05)
    assert [p is model[0].weight for p in decay["params"]] == [True]


def test_schedules():
    cos = warmup_cosine(1.0, 10, 2)
    assert [cos(0), cos(1), cos(2)] == [0.0, 0.5, 1.0]
    assert cos(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8))) and cos(10) == pytest.approx(0.0)
    const = warmup_constant(2.0, 4)
    assert [const(0), const(2), const(4), const(100)] == [0.0, 1.0, 2.0, 2.0] and warmup_constant(3.0)(0) == 3.0


def test_rng_streams_are_pure_and_independent():
    a, b = seeded_generator(CPU, 0, 1, 5), seeded_generator(CPU, 0, 1, 5)
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
    assert stream_seed(0, 1, 5) != stream_seed(0, 1, 6) and stream_seed(0, 1, 5) < 2 ** 63


# The purpose numbers the stages drew with before the streams had names: the runs stay bit-identical only while
# every name maps to the same number.
PINNED_STREAMS = {"batches.permutation": 0, "loop.dropout": 16, "encoder.crops": 1, "encoder.views": 2,
                  "tokenizer.crops": 1, "tokenizer.restart": 2, "judge.augment": 1, "ssl_judge.crops": 1,
                  "ssl_judge.views": 2, "rdm.permutation": 1, "rdm.step": 2, "rdm.eval": 3, "pixel.holdout": 10,
                  "pixel.permutation": 11, "pixel.step": 12, "pixel.kmeans": 13, "pixel.eval": 14,
                  "pixel.codebook_init": 15, "sample.chunk": 0, "sample.figure": 1 << 40}


def test_named_streams_are_unique_keep_their_numbers_and_do_not_collide_within_a_run():
    import ast

    from pipeline.core import rng
    source = ast.parse((ROOT / "pipeline" / "core" / "rng.py").read_text())
    literal = next(node.value for node in ast.walk(source) if isinstance(node, ast.AnnAssign)
                   and getattr(node.target, "id", None) == "STREAMS")
    names = [key.value for key in literal.keys]
    assert len(names) == len(set(names)), "a stream name is listed twice (the dict keeps the last)"
    assert rng.STREAMS == PINNED_STREAMS
    assert {n for run in rng.RUNS.values() for n in run} == set(rng.STREAMS), "every stream belongs to a run"
    for stage, run in rng.RUNS.items():
        numbers = [rng.STREAMS[n] for n in run]
        assert len(numbers) == len(set(numbers)), f"{stage} draws two streams with one purpose: {run}"
    assert rng.purpose("sample.chunk", 10 ** 9) < rng.purpose("sample.figure")  # chunks never reach figures
    assert stream_seed(7, "pixel.step", 3, 0, 1) == stream_seed(7, 12, 3, 0, 1)
    # every stream the code names exists
    used = set()
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "seeded_generator", "seeded_numpy", "stream_seed", "purpose"):
                used |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                         and a.value != "cpu"}
    assert used and used <= set(rng.STREAMS), sorted(used - set(rng.STREAMS))
    assert set(rng.STREAMS) - used == set(), "a registered stream no code draws from"


def test_what_to_compute_leaves_out_how_to_run():
    keys = what_to_compute()
    assert "rdm.train.steps" in keys and "tokenizer.model.ch_mult" in keys and "encoder.train.blr" in keys
    how = [k for k in keys if k.split(".")[-1] in ("workers", "log_every", "checkpoint_every", "threads")]
    assert how == [] and not [k for k in keys if k.startswith("runtime")]
    assert what_to_compute("rdm.train") == [k for k in keys if k.startswith("rdm.train.")]
    assert what_to_compute("views.crop") == ["views.crop"] and what_to_compute("runtime.compile") == []
    with pytest.raises(RcgError, match="no key 'rdm.trian'"):
        what_to_compute("rdm.trian")


def test_resume_identity_is_what_to_compute_and_inputs(tmp_path):
    keys = ["seed", "rdm.model", "rdm.train"]
    base = resume_identity(micro_params(tmp_path), keys, store={"index": "a"})
    how = micro_params(tmp_path, ["rdm.train.log_every=3", "rdm.train.checkpoint_every=4", "runtime.threads=1",
                                  "rdm.eval.num_samples=5"])
    assert resume_identity(how, keys, store={"index": "a"}) == base
    assert resume_identity(micro_params(tmp_path, ["rdm.train.blr=1e-5"]), keys, store={"index": "a"}) != base
    assert resume_identity(micro_params(tmp_path), keys, store={"index": "b"}) != base
    assert base["params"]["rdm.train.steps"] == 20 and "rdm.train.log_every" not in base["params"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_gpu_keeps_fp32_weights(tmp_path):
    cuda = torch.device("cuda")
    model = nn.Linear(4, 1).to(cuda)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    loop = TrainLoop("toy", micro_params(tmp_path), Dist(), cuda, steps=4, identity={}, modules={"model": model},
                     optimizer=opt, log_every=2, checkpoint_every=2, samples_per_step=8, bf16=True)
    dtypes = []

    def step(batch, it):
        x, y = (t.to(cuda) for t in batch)
        out = model(x)
        dtypes.append(out.dtype)
        return {"loss": (out.float() - y).pow(2).mean()}

    summary = loop.run(step, (data(it) for it in range(4)))
    assert set(dtypes) == {torch.bfloat16} and model.weight.dtype == torch.float32
    assert math.isfinite(summary["final_loss"])


@pytest.mark.integration
def test_every_training_stage_trains_the_same_under_runtime_compile(workspace, monkeypatch):
    """``runtime.compile`` routes every training stage's model through ``TrainLoop.wrap``'s ``torch.compile``.
    Traced with the eager backend (no C++ build, same arithmetic), each stage must train exactly the weights it
    trains uncompiled: the compiled wrapper is called where the model is, and nothing else changes."""
    from stages import (encode, pretrain_encoder, tokenize_views, train_judge, train_pixel, train_rdm,
                        train_ssl_judge, train_tokenizer)
    real_compile = torch.compile
    compiled = []

    def eager_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    files = {"encoder": "encoder.pt", "rdm": "rdm.pt", "tokenizer": "tokenizer.pt", "pixel": "pixel-rep.pt",
             "judge": "judge.pt", "ssl_judge": "ssl_judge.pt"}
    weights = {}
    for mode in ("false", "true"):
        root = workspace / mode
        (root / "data").mkdir(parents=True)
        os.symlink(workspace / "data" / "shards", root / "data" / "shards")
        params = micro_params(root, [f"runtime.compile={mode}", "pixel.conditionings=[rep]"])
        for stage in (pretrain_encoder, encode, train_rdm, train_tokenizer, tokenize_views, train_judge, train_ssl_judge):
            stage.run(params)
        train_pixel.run(params, "rep")
        weights[mode] = {name: torch.load(params.paths.models / file, weights_only=True)["state_dict"]
                         for name, file in files.items()}
    assert len(compiled) == 6, compiled  # one wrap per training stage
    for name in files:
        plain, traced = weights["false"][name], weights["true"][name]
        assert plain.keys() == traced.keys(), name
        for key in plain:
            assert torch.allclose(plain[key].float(), traced[key].float(), atol=1e-6), (name, key)


def test_the_epoch_chain_under_every_batcher_crosses_epochs_and_drops_tails():
    from pipeline.data.batches import EpochChain
    drawn = []
    chain = EpochChain(lambda e: drawn.append(e) or torch.arange(5) + 10 * e, 5)
    assert chain.rows(3, 4).tolist() == [3, 4, 10, 11] and chain.rows(7, 2).tolist() == [12, 13]
    assert drawn == [0, 1]  # walking forward draws each epoch's permutation once
    assert EpochChain(lambda e: torch.arange(5) + 10 * e, 4).rows(2, 4).tolist() == [2, 3, 10, 11]  # tail dropped
