import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.core.artifacts import load_checkpoint, load_model, load_model_file, save_model_file, weights_sha256
from pipeline.core.config import EncoderModel
import pipeline.samplers.diffusion as sampler
import pipeline.train.rdm as rdm_training
from pipeline.core.distributed import Dist
from pipeline.models.encoder import build_encoder
from pipeline.core.errors import RcgError
from pipeline.data.rep_store import RepBatches, load_store, store_stats
from pipeline.models.rdm import RDM, rdm_kwargs
from pipeline.data.stores import StoreWriter
from stages import train_rdm
from conftest import MICRO, micro_params
from official_files import rdm_file

N, V, D, CLASSES = 48, 2, 16, 10
OFFICIAL = ["rdm.model.whiten_power=0", "rdm.train.min_snr_gamma=null"]  # how official RDM files are trained
ENCODER = build_encoder(MICRO["encoder"]["model"]).state_dict()  # stands in for the encoder a store was made with



def load(params):
    return load_store(params.paths.reps, params.rdm.model, torch.device("cpu"))


def identity(weights: bool = True) -> dict:
    encoder = {"sha256": "0" * 64, "config": {"model": EncoderModel(**MICRO["encoder"]["model"]).model_dump()}}
    if weights:
        encoder["weights_sha256"] = weights_sha256(ENCODER)
    return {"encoder": encoder, "views": {"count": V}, "index": {"rows": N}}


def make_store(root: Path, labels: np.ndarray | None = None, nan_at: tuple[int, int] | None = None,
               ident: dict | None = None, n: int = N) -> Path:
    """A small reps.zarr like real ones: a class mixture, standardised per sample."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % CLASSES if labels is None else labels
    means = rng.normal(size=(CLASSES, D)) * 2
    x = means[np.clip(y, 0, None) % CLASSES][:, None] + rng.normal(size=(n, V, D))
    x = (x - x.mean(-1, keepdims=True)) / x.std(-1, ddof=1, keepdims=True)
    if nan_at is not None:
        x[nan_at] = np.nan
    path = root / "data" / "reps.zarr"
    writer = StoreWriter(path, "reps", (n, V, D), "float32", 16, ident or identity(), y)
    for c in writer.pending():
        r = writer.rows(c)
        writer.write(c, x[r.start:r.stop].astype(np.float32))
    writer.finalize()
    return path


def read_curve(root: Path) -> list[dict]:
    with open(root / "metrics" / "plots" / "train_rdm.csv") as f:
        return list(csv.DictReader(f))


def test_trains_from_the_store_and_writes_model_metrics_curves(tmp_path):
    make_store(tmp_path)
    params = micro_params(tmp_path)
    summary = train_rdm.run(params)

    payload = load_model_file(tmp_path / "data" / "models" / "rdm.pt", "rcg-rdm")  # weights_only=True
    assert payload["config"]["model"] == rdm_kwargs(params.rdm.model)
    assert payload["config"]["store"] == identity()
    assert payload["config"]["sample"] == {"steps": 10, "eta": 0.0, "temperature": 1.0}
    ema = payload["ema_state_dict"]
    assert int(ema["num_updates"]) == 20
    raw = payload["state_dict"]
    assert set(ema) - {"num_updates"} == {k[len("net."):] for k in raw if k.startswith("net.")}
    assert not torch.equal(ema["out.2.weight"], raw["net.out.2.weight"])  # an average, not a copy

    model, payload = load_model("rdm", tmp_path / "data" / "models" / "rdm.pt")
    config = payload["config"]
    assert torch.equal(model.net.out[2].weight, ema["out.2.weight"])  # samples with the EMA weights
    assert config["diffusion"]["timesteps"] == 1000

    metrics = json.loads((tmp_path / "metrics" / "rdm.json").read_text())
    assert metrics["num_samples"] == 32 and metrics["weights"] == "ema" and metrics["source"] == "trained"
    assert metrics["fd_generated"] > 0 and metrics["fd_lower_bound"] > 0
    assert metrics["ratio"] == pytest.approx(metrics["fd_generated"] / metrics["fd_lower_bound"])
    assert "class_agreement" not in metrics
    assert summary["ratio"] == metrics["ratio"]

    curve = read_curve(tmp_path)
    assert [int(r["step"]) for r in curve] == [5, 10, 15, 20]
    assert all(np.isfinite(float(r["loss"])) for r in curve)
    blr = micro_params(tmp_path).rdm.train.blr
    assert float(curve[0]["lr"]) == pytest.approx(blr * 16)  # blr * batch * world, constant


def test_a_perfect_sampler_scores_the_lower_bound(tmp_path, monkeypatch):
    """The lower bound is what a sampler that draws the store's own reps i.i.d. scores, so such a sampler's ratio is
    ~1. M distinct images out of N (a finite-population sample) would give a bound that shrinks towards 0 as M
    approaches N: at M = N/2 it is ~40% lower, a ratio of ~1.6 for the perfect sampler."""
    store = make_store(tmp_path, n=1000)
    reps = torch.from_numpy(np.asarray(zarr.open_group(store, mode="r")["reps"][:])).reshape(-1, D)

    def perfect(self, model, shape, y, generator=None, **kwargs):  # in the RDM's space, as the sampler works
        return model.whitening.encode(reps[torch.randint(len(reps), (shape[0],), generator=generator)])

    monkeypatch.setattr(sampler, "ddim_sample", perfect)
    ratios, spreads = [], []
    for seed in range(4):
        params = micro_params(tmp_path, [f"seed={seed}", "rdm.train.steps=1", "rdm.eval.num_samples=500"])
        train_rdm.run(params)
        metrics = json.loads((tmp_path / "metrics" / "rdm.json").read_text())
        ratios.append(metrics["ratio"])
        spreads.append(metrics["fd_lower_bound_std"] / metrics["fd_lower_bound"])
        assert abs(metrics["precision"] - metrics["precision_real"]) < 0.1  # real reps by both measures
        assert abs(metrics["recall"] - metrics["recall_real"]) < 0.1
        assert 0 <= metrics["precision_gaussian_fit"] <= 1 and 0 <= metrics["recall_gaussian_fit"] <= 1
    assert 0.85 < np.mean(ratios) < 1.15, ratios
    assert 0 < np.mean(spreads) < 0.5


def test_whitened_min_snr_training_keeps_its_map_in_the_model_file(tmp_path):
    make_store(tmp_path)
    params = micro_params(tmp_path, ["rdm.model.whiten_power=0.25", "rdm.train.min_snr_gamma=5"])
    train_rdm.run(params)
    model, payload = load_model("rdm", tmp_path / "data" / "models" / "rdm.pt")
    config = payload["config"]
    assert config["whitening"] == {"whiten_power": 0.25, "whiten_eps": 1e-3} and config["min_snr_gamma"] == 5
    store = load(params)
    mean, _ = store_stats(store.reps)
    assert torch.allclose(model.whitening.mean, torch.from_numpy(mean).float())
    z = model.whitening.encode(store.reps.reshape(-1, D)).double()
    assert torch.cov(z.T).diagonal().mean().item() == pytest.approx(1.0, rel=1e-3)  # the space it trained in
    assert json.loads((tmp_path / "metrics" / "rdm.json").read_text())["fd_generated"] > 0


def test_training_sees_whitened_reps_and_the_min_snr_weight(tmp_path, monkeypatch):
    make_store(tmp_path)
    store = torch.from_numpy(np.asarray(zarr.open_group(tmp_path / "data" / "reps.zarr", mode="r")["reps"][:]))
    seen, original = [], rdm_training.x0_loss

    def spy(self, model_fn, x0, y, generator=None, min_snr_gamma=None):
        seen.append((x0.detach().clone(), min_snr_gamma))
        return original(self, model_fn, x0, y, generator=generator, min_snr_gamma=min_snr_gamma)

    monkeypatch.setattr(rdm_training, "x0_loss", spy)
    train_rdm.run(micro_params(tmp_path, ["rdm.model.whiten_power=0.25", "rdm.train.min_snr_gamma=5",
                                          "rdm.eval.num_samples=8"]))
    x0 = torch.cat([x for x, _ in seen])
    assert {g for _, g in seen} == {5.0}
    assert x0.mean(0).abs().max() < 0.25 and x0.var(0).mean().item() == pytest.approx(1.0, rel=0.15)
    assert not any(torch.equal(x0[0], r) for r in store.reshape(-1, D))

    make_store(tmp_path / "official")
    seen.clear()
    train_rdm.run(micro_params(tmp_path / "official", OFFICIAL + ["rdm.eval.num_samples=8"]))
    assert {g for _, g in seen} == {None}
    rows = store.reshape(-1, D)
    assert all(any(torch.equal(x, r) for r in rows) for x in torch.cat([x for x, _ in seen])[:32])  # raw reps


def test_resume_identity_is_the_store_and_the_what_to_compute_params(tmp_path):
    """A finished state is reused across how-to-run changes only: another store, another training param or another
    seed trains again."""
    make_store(tmp_path)
    assert train_rdm.run(micro_params(tmp_path, ["rdm.eval.num_samples=8"]))["resumed_from"] == 0
    rerun = ["rdm.eval.num_samples=8", "rdm.train.log_every=4", "rdm.train.checkpoint_every=7", "runtime.threads=1"]
    assert train_rdm.run(micro_params(tmp_path, rerun))["resumed_from"] == 20
    assert train_rdm.run(micro_params(tmp_path, ["rdm.eval.num_samples=8", "rdm.train.ema_decay=0.99"]))[
        "resumed_from"] == 0
    make_store(tmp_path, ident={**identity(), "views": {"count": V, "seed": 1}})  # same reps, another identity
    assert train_rdm.run(micro_params(tmp_path, ["rdm.eval.num_samples=8"]))["resumed_from"] == 0


def test_a_model_file_without_its_whitening_is_refused(tmp_path):
    make_store(tmp_path)
    train_rdm.run(micro_params(tmp_path, ["rdm.eval.num_samples=8"]))
    path = tmp_path / "data" / "models" / "rdm.pt"
    payload = load_model_file(path, "rcg-rdm")
    old = {k: v for k, v in payload["state_dict"].items() if not k.startswith("whitening.")}
    save_model_file(path, "rcg-rdm", payload["config"], old, payload["ema_state_dict"], payload["summary"])
    with pytest.raises(RcgError, match="predates RDM files that carry their whitening map; rerun train_rdm"):
        load_model("rdm", path)


def test_warmup_and_cosine_schedule(tmp_path):
    make_store(tmp_path)
    train_rdm.run(micro_params(tmp_path, ["rdm.train.warmup_steps=10", "rdm.train.cosine=true",
                                          "rdm.eval.num_samples=8"]))
    lr = [float(r["lr"]) for r in read_curve(tmp_path)]  # at steps 5, 10, 15, 20 (iterations 4, 9, 14, 19)
    base = micro_params(tmp_path).rdm.train.blr * 16
    assert lr[:2] == pytest.approx([base * 4 / 10, base * 9 / 10], rel=1e-5)  # the CSV keeps 6 digits
    assert lr[2] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 4 / 10)), rel=1e-5)
    assert 0 < lr[3] < lr[2]


def test_batches_are_a_function_of_the_step(tmp_path):
    make_store(tmp_path)
    store = load(micro_params(tmp_path))
    a, b = RepBatches(store, 8, 0, Dist()), RepBatches(store, 8, 0, Dist())
    for step in (4, 0, 11):
        xa, ra, ga = a(step)
        xb, rb, gb = b(step)
        assert torch.equal(xa, xb) and torch.equal(ra, rb)
        assert torch.equal(torch.randn(3, generator=ga), torch.randn(3, generator=gb))
    # one epoch (6 steps of 8) visits every image once; each x0 is one of that image's views
    rows = torch.cat([a(s)[1] for s in range(6)])
    assert sorted(rows.tolist()) == list(range(N))
    x0, rows, _ = a(1)
    assert all(any(torch.equal(x, store.reps[r, v]) for v in range(V)) for x, r in zip(x0, rows))
    # two ranks split a step's images without overlap
    r0, r1 = (RepBatches(store, 8, 0, Dist(rank, 2, 0))(3)[1] for rank in (0, 1))
    assert not set(r0.tolist()) & set(r1.tolist())


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    make_store(whole)
    make_store(killed)
    train_rdm.run(micro_params(whole))

    original = RepBatches.__call__

    def die_at_13(self, step):
        if step == 12:  # the 13th step: after the checkpoint at 10
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(RepBatches, "__call__", die_at_13)
    with pytest.raises(KeyboardInterrupt):
        train_rdm.run(micro_params(killed))
    assert load_checkpoint(killed / "data" / "state" / "train_rdm.pt")["step"] == 10
    assert not (killed / "data" / "models" / "rdm.pt").exists()
    monkeypatch.setattr(RepBatches, "__call__", original)
    summary = train_rdm.run(micro_params(killed))
    assert summary["resumed_from"] == 10

    a = load_model_file(whole / "data" / "models" / "rdm.pt", "rcg-rdm")
    b = load_model_file(killed / "data" / "models" / "rdm.pt", "rcg-rdm")
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert read_curve(whole) == read_curve(killed)
    # a finished state is reused: a rerun (e.g. after an eval-only param change) trains nothing
    assert train_rdm.run(micro_params(killed, ["rdm.eval.num_samples=24"]))["resumed_from"] == 20


def test_nan_in_store_names_the_row(tmp_path):
    make_store(tmp_path, nan_at=(37, 1))
    with pytest.raises(RcgError, match=r"row 37 \(view 1\) holds NaN"):
        train_rdm.run(micro_params(tmp_path))


def test_nan_loss_names_the_step_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    make_store(tmp_path)
    calls = {"n": 0}
    original = rdm_training.x0_loss

    def nan_from_step_12(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 12 else loss

    monkeypatch.setattr(rdm_training, "x0_loss", nan_from_step_12)
    state = tmp_path / "data" / "state" / "train_rdm.pt"
    with pytest.raises(RcgError, match=r"non-finite loss .* at step 12;.*train_rdm\.pt"):
        train_rdm.run(micro_params(tmp_path))
    assert load_checkpoint(state)["step"] == 10
    assert not (tmp_path / "data" / "models" / "rdm.pt").exists()


def test_store_that_does_not_fit_the_config(tmp_path):
    make_store(tmp_path)
    with pytest.raises(RcgError, match="16-d representations but rdm.model.in_channels is 32"):
        train_rdm.run(micro_params(tmp_path, ["rdm.model.in_channels=32"]))
    with pytest.raises(RcgError, match="label 9 does not fit rdm.model.num_classes"):
        train_rdm.run(micro_params(tmp_path, ["rdm.model.class_cond=true", "rdm.model.num_classes=5"]))
    with pytest.raises(RcgError, match="exceeds the store's 48 images"):
        train_rdm.run(micro_params(tmp_path, ["rdm.train.batch_size=64"]))


def test_class_cond_needs_labels(tmp_path):
    make_store(tmp_path, labels=np.full(N, -1))
    with pytest.raises(RcgError, match="needs labels, but row 0 has none"):
        train_rdm.run(micro_params(tmp_path, ["rdm.model.class_cond=true"]))


def test_class_conditional_rdm_and_its_class_agreement(tmp_path):
    make_store(tmp_path)
    params = micro_params(tmp_path, ["rdm.model.class_cond=true", "rdm.train.steps=10", "rdm.eval.knn_k=3"])
    train_rdm.run(params)
    payload = load_model_file(tmp_path / "data" / "models" / "rdm.pt", "rcg-rdm")
    assert payload["config"]["model"]["class_cond"] and payload["config"]["model"]["n_classes"] == CLASSES
    assert payload["state_dict"]["cond_stage_model.embedding.weight"].shape == (CLASSES, 16)
    metrics = json.loads((tmp_path / "metrics" / "rdm.json").read_text())
    assert 0 <= metrics["class_agreement"] <= 1 and metrics["knn_k"] == 3
    assert metrics["class_agreement_real"] > 0.5  # the toy classes are well separated in the store


# ---------------------------------------------------------------------------------------------------
# Official checkpoint import

def official_file(path: Path, config: dict, encoder_sd: dict, ema_offset: float = 0.5) -> RDM:
    """A tiny seeded RDM written in the official RCG layout (official_files.rdm_file); returns it."""
    torch.manual_seed(1)
    src = RDM(**config)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    rdm_file(path, src, encoder_sd, ema_offset)
    return src


def test_imports_an_official_checkpoint(tmp_path):
    make_store(tmp_path)
    params = micro_params(tmp_path)
    ckpt = tmp_path / "checkpoint-last.pth"
    src = official_file(ckpt, rdm_kwargs(params.rdm.model), ENCODER)
    summary = train_rdm.run(micro_params(tmp_path, [*OFFICIAL, f"rdm.checkpoint={ckpt}"]))
    assert summary["source"] == "official" and summary["encoder_check"] == "weights"
    assert not (tmp_path / "data" / "state" / "train_rdm.pt").exists()  # nothing trained

    payload = load_model_file(tmp_path / "data" / "models" / "rdm.pt", "rcg-rdm")
    for k, v in src.net.state_dict().items():
        assert torch.equal(payload["state_dict"]["net." + k], v)
        assert torch.equal(payload["ema_state_dict"][k], v + 0.5)
    metrics = json.loads((tmp_path / "metrics" / "rdm.json").read_text())
    assert metrics["source"] == "official" and metrics["weights"] == "ema" and metrics["fd_generated"] > 0


def test_an_official_file_loads_without_a_store(tmp_path):
    """official_rdm needs the file alone: the raw weights in eval mode, the EMA beside them, the file's config."""
    from pipeline.models.official.rdm import official_rdm
    ckpt = tmp_path / "checkpoint-last.pth"
    config = rdm_kwargs(micro_params(tmp_path).rdm.model)
    src = official_file(ckpt, config, ENCODER)
    model, ema, got, sd = official_rdm(ckpt)
    assert got == {k: v for k, v in config.items() if k != "dropout"} and not model.training
    assert "pretrained_encoder.cls_token" in sd
    for k, v in src.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v)
    ema.copy_to(model.net)
    for k, v in src.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v + 0.5)


def test_official_checkpoint_must_fit_the_store_and_params(tmp_path):
    ckpt = tmp_path / "checkpoint-last.pth"
    config = rdm_kwargs(micro_params(tmp_path).rdm.model)
    torch.manual_seed(5)
    other_weights = build_encoder(MICRO["encoder"]["model"]).state_dict()
    official_file(ckpt, config, other_weights)
    make_store(tmp_path)
    with pytest.raises(RcgError, match="trained with another encoder.*same architecture, different weights"):
        train_rdm.run(micro_params(tmp_path, [*OFFICIAL, f"rdm.checkpoint={ckpt}"]))

    wider = build_encoder({**MICRO["encoder"]["model"], "embed_dim": 48}).state_dict()
    official_file(ckpt, config, wider)
    with pytest.raises(RcgError, match="trained with another encoder.*embed_dim 48 \\(store's encoder: 32\\)"):
        train_rdm.run(micro_params(tmp_path, [*OFFICIAL, f"rdm.checkpoint={ckpt}"]))

    official_file(ckpt, config, ENCODER)
    with pytest.raises(RcgError, match=r"does not match rdm.model: num_res_blocks 3 \(file: 2\)"):
        train_rdm.run(micro_params(tmp_path, [*OFFICIAL, f"rdm.checkpoint={ckpt}", "rdm.model.num_res_blocks=3"]))
    with pytest.raises(RcgError, match=r"whiten_power 0.15 \(official RDMs run on the raw reps: 0\)"):
        train_rdm.run(micro_params(tmp_path, [*OFFICIAL, f"rdm.checkpoint={ckpt}", "rdm.model.whiten_power=0.15"]))


def test_store_without_a_weights_hash_checks_the_architecture(tmp_path):
    make_store(tmp_path, ident=identity(weights=False))
    ckpt = tmp_path / "checkpoint-last.pth"
    official_file(ckpt, rdm_kwargs(micro_params(tmp_path).rdm.model), ENCODER)
    summary = train_rdm.run(micro_params(tmp_path, [*OFFICIAL, f"rdm.checkpoint={ckpt}", "rdm.eval.num_samples=16"]))
    assert summary["encoder_check"] == "architecture"
