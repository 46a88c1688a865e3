"""Stages train_judge, reference, score and compare on the micro shards, with tiny sample stores written here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.artifacts import load_model, save_model_file
from pipeline.core.config import dump_yaml
from pipeline.core.errors import RcgError
from pipeline.data.sample_store import SampleWriter
from pipeline.data.shards import ShardSet
from pipeline.data.eval_images import centre_crop
from pipeline.eval.fidelity import EXTRACTOR_NAMES, raised
from pipeline.models.encoder import MODEL_FORMAT as ENCODER_FORMAT, build_encoder
import pipeline.models.judge  # noqa: F401  (registers the "judge" model kind)
from stages import compare, reference, score, train_judge, train_ssl_judge
from conftest import micro_params
from test_fidelity import SMALL_DINOV2, write_random_dinov2, write_random_inception
from test_metrics_files import problems

SCORE = {"num_reference_images": 0, "kid_subset_size": 20, "kid_subsets": 10, "isc_splits": 4, "min_samples": 20}


def params_for(root, **score_overrides):
    return micro_params(root, extra={"judge": {"train": {"epochs": 3, "batch_size": 16}},
                                     "score": {**SCORE, **score_overrides}})


def write_samples(root, setting: str, images: np.ndarray) -> None:
    """A sample store as the sample stage writes it (pipeline.data.sample_store), chunks of 8 rows."""
    writer = SampleWriter(root / "data" / "samples" / f"{setting}.zarr", len(images), images.shape[1:], 8, {},
                          {"setting": setting, "models": {}, "seeds": [0]}, rep_dim=None, with_labels=False)
    for c in range(writer.num_chunks):
        r = writer.rows(c)
        writer.write(c, images[r.start:r.stop])
    writer.finalize({"seconds": 1.5})


def val_images(root, size: int = 16) -> np.ndarray:
    shards = ShardSet(root / "data" / "shards", "val")
    return np.stack([centre_crop(shards.read(i), size) for i in range(len(shards))])


@pytest.fixture(scope="module")
def scored(tmp_path_factory, micro_shards):
    """A project with a trained judge and ssl_judge, a random-init encoder model file, reference statistics in
    every space and samples of three settings: real held-out images (oracle), noise (baseline), real images
    darkened (rcg); and the real row (the held-out split itself)."""
    root = tmp_path_factory.mktemp("score")
    shutil.copytree(micro_shards, root / "data" / "shards")
    params = params_for(root)
    torch.manual_seed(0)
    cfg = params.encoder.model.model_dump()
    save_model_file(root / "data" / "models" / "encoder.pt", ENCODER_FORMAT, {"model": cfg}, build_encoder(cfg).state_dict())
    judged = train_judge.run(params)
    train_ssl_judge.run(params)
    for space in params.score.spaces:
        reference.run(params, space)
    real = val_images(root)  # 16 held-out images
    noise = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    write_samples(root, "oracle", real)
    write_samples(root, "baseline", noise)
    write_samples(root, "rcg", (real // 3).astype(np.uint8))
    results = {s: score.run(params, s) for s in ("oracle", "baseline", "rcg", "real")}
    return root, params, judged, results


def test_train_judge_writes_a_judge_that_registers(scored):
    root, params, judged, _ = scored
    metrics = json.loads((root / "metrics" / "judge.json").read_text())
    assert metrics["num_train"] == 48 and metrics["num_val"] == 16 and metrics["num_classes"] == 10
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["steps"] == 9 and judged["val_accuracy"] == metrics["val_accuracy"]
    model, payload = load_model("judge", root / "data" / "models" / "judge.pt")
    assert payload["config"]["model"]["img_size"] == 16 and model.feature_dim == 128
    assert EXTRACTOR_NAMES["judge"] == "rcg-judge"
    assert (root / "metrics" / "plots" / "train_judge.csv").is_file()  # the shared loop's curve


def test_reference_holds_float64_statistics_per_space(scored):
    root = scored[0]
    meta = {s: json.loads((root / "data" / "reference" / f"{s}.json").read_text()) for s in ("judge", "encoder")}
    assert meta["judge"]["resolution"] == 16 and meta["judge"]["num_images"] == 48 and meta["judge"]["space"] == "judge"
    with np.load(root / "data" / "reference" / "judge.npz") as npz:
        assert npz["mu"].dtype == np.float64 and npz["sigma"].shape == (128, 128) and npz["features"].shape == (48, 128)
    assert meta["encoder"]["dim"] == 16


def test_scores_rank_real_images_above_noise(scored):
    root = scored[0]
    s = {name: json.loads((root / "metrics" / "score" / f"{name}.json").read_text()) for name in ("oracle", "baseline")}
    assert s["oracle"]["judge"]["fid"] < s["baseline"]["judge"]["fid"]
    assert s["oracle"]["encoder"]["fd"] < s["baseline"]["encoder"]["fd"]
    assert s["oracle"]["judge"]["recall"] > s["baseline"]["judge"]["recall"]
    assert s["oracle"]["ssl_judge"]["fd"] < s["baseline"]["ssl_judge"]["fd"]  # the label-free space agrees
    oracle = s["oracle"]
    assert oracle["num_samples"] == 16 and oracle["judge"]["num_samples"] == 16 and oracle["judge"]["reference"] == "train:48"
    assert oracle["judge"]["isc"] >= 1 and "isc" not in oracle["encoder"] and oracle["sample_seconds"] == 1.5
    assert raised(oracle["judge"]) == ["few_samples", "kid_subset_reduced"]  # 16 < min_samples, < kid subset
    assert raised(s["baseline"]["judge"]) == []  # 24 samples: enough for both
    assert not problems(oracle)  # one row of a table: numbers, bools, short ids


def test_the_real_row_scores_the_held_out_images_exactly_like_samples(scored):
    """The oracle store here holds the val split's centre crops: the real row (the same images, read from the
    shards) gets the same figures in every space."""
    root = scored[0]
    oracle, real = (json.loads((root / "metrics" / "score" / f"{n}.json").read_text()) for n in ("oracle", "real"))
    assert real["setting"] == "real" and real["num_samples"] == oracle["num_samples"] == 16
    for space in ("judge", "encoder", "ssl_judge"):
        assert real[space] == oracle[space], space


def test_compare_table_holds_every_row_with_its_counts(scored):
    root, params, _, _ = scored
    out = compare.run(params)
    assert out["settings"] == ["baseline", "rcg", "oracle", "real"]  # the paper's order, unscored settings left out
    table = json.loads((root / "metrics" / "compare.json").read_text())
    assert table["baseline"]["num_samples"] == 24 and table["oracle"]["num_samples"] == 16
    assert "inception_fid" not in table["rcg"] and table["headline"] == "judge"
    md = (root / "metrics" / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    assert all(h in header for h in ("judge FID", "judge IS", "precision (judge)", "ssl FD", "rep FD", "samples",
                                     "score s"))
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "rcg", "oracle", "real"]
    assert all(r.split("|")[-4].strip() in ("24", "16") for r in rows)
    assert "favours the rep-conditioned" in md and "warning: oracle/judge: few_samples" in md


def test_bad_input_is_one_line(scored, tmp_path):
    root, params, _, _ = scored
    with pytest.raises(RcgError, match="unknown setting 'nope'"):
        score.run(params, "nope")
    with pytest.raises(RcgError, match="no sample store"):
        score.run(params, "cluster")
    write_samples(root, "class", np.zeros((24, 24, 24, 3), np.uint8))  # another resolution than the reference
    with pytest.raises(RcgError, match="24x24 but the judge reference .* 16x16"):
        score.run(params, "class")
    write_samples(root, "class", np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(RcgError, match="holds 3 samples; the metrics need at least 4"):
        score.run(params, "class")
    np.savez(tmp_path / "other.npz", mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(RcgError, match=r"\[7\] / \[7, 7\] statistics, but the judge space has 128-d"):
        score.run(params_for(root, reference_npz={"judge": str(tmp_path / "other.npz")}), "oracle")
    with pytest.raises(RcgError, match="score.reference_npz.encoder: encoder is not in score.spaces"):
        params_for(root, spaces=["judge"], ssl_spaces=[], reference_npz={"encoder": str(tmp_path / "other.npz")})


def test_user_npz_replaces_the_fd_reference_only(scored, tmp_path):
    root, params, _, _ = scored
    with np.load(root / "data" / "reference" / "judge.npz") as npz:
        np.savez(tmp_path / "adm_like.npz", mu=npz["mu"].astype(np.float32) + 1, sigma=npz["sigma"])
    ours = json.loads((root / "metrics" / "score" / "oracle.json").read_text())["judge"]
    theirs = score.run(params_for(root, reference_npz={"judge": str(tmp_path / "adm_like.npz")}), "oracle")
    judged = json.loads((root / "metrics" / "score" / "oracle.json").read_text())["judge"]
    assert judged["reference"] == "npz:adm_like" and judged["feature_reference"] == "train:48"
    assert judged["fid"] != ours["fid"] and judged["kid"] == ours["kid"] and theirs["judge_fid"] == judged["fid"]
    score.run(params, "oracle")  # restore for the other tests


def test_stale_reference_is_refused(scored, tmp_path):
    root = scored[0]
    work = tmp_path / "proj"
    shutil.copytree(root / "data", work / "data")
    params = params_for(work)
    score.run(params, "oracle")
    model, payload = load_model("judge", work / "data" / "models" / "judge.pt")
    save_model_file(work / "data" / "models" / "judge.pt", "rcg-judge", payload["config"],
                    {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    with pytest.raises(RcgError, match="computed with another .*judge.pt: rerun `rcg reference judge`"):
        score.run(params, "oracle")


@pytest.mark.slow  # ~1 min on 2 busy CPU cores: Inception at 299 px (the fast path test is in test_fidelity)
def test_inception_scores_through_the_same_path(scored, tmp_path):
    """With score.inception_weights (a random-weights file in torch-fidelity's layout): Inception FID, IS, KID
    and precision/recall next to the other spaces, and an Inception column in the table. Random weights shrink the
    activations layer by layer, so the figures are near 0 / 1: this checks the wiring, not the values."""
    root = scored[0]
    work = tmp_path / "proj"
    shutil.copytree(root / "data", work / "data")
    weights = write_random_inception(tmp_path / "weights-inception.pth")
    params = params_for(work, inception_weights=str(weights), spaces=["judge"], ssl_spaces=[], num_reference_images=8,
                        isc_splits=2, prc_k=2, kid_subset_size=4, min_samples=4)
    assert [reference.run(params, s)["space"] for s in ("judge", "inception")] == ["judge", "inception"]
    write_samples(work, "oracle", val_images(work)[:6])
    out = json.loads(Path(score.run(params, "oracle")["output"]).read_text())
    inc = out["inception"]
    assert inc["num_samples"] == 6 and inc["reference"] == "train:8" and inc["fid"] >= 0 and inc["isc"] >= 1
    assert inc["kid"] is not None and 0 <= inc["precision"] <= 1 and "encoder" not in out
    compare.run(params)
    assert "Inception FID" in (work / "metrics" / "compare.md").read_text()


def test_dinov2_scores_through_the_same_path(workspace, tmp_path):
    """With score.dinov2_weights (a random-weights small DINOv2 in timm's layout; score.dinov2_arch names it) and no
    listed space: ``rcg reference dinov2`` and ``rcg score`` give FD_DINOv2, KID and precision/recall, and the
    table a DINOv2 column. Nothing else is trained or read."""
    weights = write_random_dinov2(tmp_path / "dinov2_vits14_timm.pth")
    params = params_for(workspace, spaces=[], label_spaces=[], ssl_spaces=[], dinov2_weights=str(weights),
                        dinov2_arch=SMALL_DINOV2, num_reference_images=8, prc_k=2, kid_subset_size=4, min_samples=4)
    ref = reference.run(params, "dinov2")
    assert ref["space"] == "dinov2" and ref["num_images"] == 8
    meta = json.loads((workspace / "data" / "reference" / "dinov2.json").read_text())
    assert meta["extractor"] == "rcg-dinov2" and meta["layer"] == "cls" and meta["dim"] == 384
    write_samples(workspace, "oracle", val_images(workspace)[:6])
    write_samples(workspace, "baseline", np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    out = {s: json.loads(Path(score.run(params, s)["output"]).read_text()) for s in ("oracle", "baseline")}
    dino = out["oracle"]["dinov2"]
    assert set(out["oracle"]) & {"judge", "encoder", "ssl_judge", "inception"} == set()
    assert dino["num_samples"] == 6 and dino["reference"] == "train:8" and np.isfinite(dino["fd"]) and dino["fd"] >= 0
    assert dino["kid"] is not None and 0 <= dino["precision"] <= 1 and 0 <= dino["recall"] <= 1
    assert dino["fd"] < out["baseline"]["dinov2"]["fd"]  # real images nearer the train split than noise
    compare.run(params)
    md = (workspace / "metrics" / "compare.md").read_text()
    assert "DINOv2 FD" in md and "precision (dinov2)" in md
    table = json.loads((workspace / "metrics" / "compare.json").read_text())
    assert table["headline"] == "dinov2" and table["oracle"]["dinov2_fd"] == dino["fd"]
    assert not problems(out["oracle"]) and not problems(table)  # rows of a table: numbers, bools, short ids
    assert "`dinov2_fd`" in (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    from typer.testing import CliRunner  # offline: the same figures from the store, the npz and --dinov2-weights

    from stages.cli import app
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(params))
    ref = workspace / "data" / "reference" / "dinov2.npz"
    store = str(workspace / "data" / "samples" / "oracle.zarr")
    unset = ["--set", "score.dinov2_weights=null", "--set", "score.spaces=[encoder]"]  # the flag alone gives it
    res = CliRunner().invoke(app, ["score", "--samples", store, "--reference-npz", f"dinov2={ref}", "--dinov2-weights",
                                   str(weights), "--params", str(path), *unset])
    assert res.exit_code == 0, res.output
    offline = json.loads(res.stdout)["dinov2"]
    assert all(offline[k] == dino[k] for k in ("fd", "kid", "precision", "recall"))
    res = CliRunner().invoke(app, ["score", "--samples", store, "--reference-npz", f"dinov2={ref}", "--params",
                                   str(path), *unset])
    assert res.exit_code == 2 and "needs --dinov2-weights FILE (a DINOv2 ViT-L/14 state dict" in res.output


@pytest.mark.integration
def test_cli_score_bad_input_is_one_line(scored, tmp_path):
    """``rcg score SETTING`` as dvc.yaml calls it: a missing sample store is one line and exit code 2."""
    root, params = scored[0], scored[1]
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(params))
    env = {**os.environ, "RCG_PROGRESS": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-m", "stages.cli", "score", "cluster", "-p", str(path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"rcg score: error: no sample store at {root}/data/samples/cluster.zarr: run `rcg sample cluster` first"]


def adm_like(path: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """An npz laid out as ADM's reference batch: images (arr_0, here an object array that allow_pickle=False
    refuses to load, so a read of it fails), mu/sigma and the sFID statistics."""
    np.savez(path, arr_0=np.array([{"images": "decoy"}], dtype=object), mu=mu, sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    return path


def test_score_with_only_a_reference_npz(scored, tmp_path):
    """No `rcg reference` (no <space>.json): a space with score.reference_npz scores from the npz alone (Fréchet
    distance and IS; no reference features, so no KID or precision/recall); a space without one still asks for it."""
    root = scored[0]
    work = tmp_path / "proj"
    for part in ("samples", "models"):
        shutil.copytree(root / "data" / part, work / "data" / part)
    with np.load(root / "data" / "reference" / "judge.npz") as npz:
        adm = adm_like(tmp_path / "adm.npz", npz["mu"], npz["sigma"])
    out = score.run(params_for(work, spaces=["judge"], ssl_spaces=[], reference_npz={"judge": str(adm)}), "oracle")
    judged = json.loads(Path(out["output"]).read_text())["judge"]
    ours = json.loads((root / "metrics" / "score" / "oracle.json").read_text())["judge"]
    assert judged["reference"] == "npz:adm" and judged["fid"] == ours["fid"] and judged["isc"] == ours["isc"]
    assert "kid" not in judged and raised(judged) == ["few_samples", "no_reference_features"]
    with pytest.raises(RcgError, match="no encoder reference statistics at .*: run `rcg reference encoder` first "
                                       "\\(or give score.reference_npz.encoder\\)"):
        score.run(params_for(work, reference_npz={"judge": str(adm)}), "oracle")


def test_cli_offline_score_of_a_folder_and_a_store(scored, tmp_path):
    """``rcg score --samples`` outside the graph: a folder of PNGs and the store they came from score the same
    against a reference npz given by path (ours, with features: KID and precision/recall too); an ADM-style npz
    gives FID and IS; the figures go to --out as JSON."""
    from PIL import Image
    from typer.testing import CliRunner

    from stages.cli import app

    root, params = scored[0], scored[1]
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(params))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(val_images(root)):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    ref, judge = root / "data" / "reference" / "judge.npz", root / "data" / "models" / "judge.pt"
    runner, common = CliRunner(), ["--params", str(path), "--judge", str(judge)]
    res = runner.invoke(app, ["score", "--samples", str(folder), "--reference-npz", f"judge={ref}", *common,
                              "--out", str(tmp_path / "folder.json")])
    assert res.exit_code == 0, res.output
    from_folder = json.loads((tmp_path / "folder.json").read_text())
    assert json.loads(res.stdout)["judge_fid"] == from_folder["judge"]["fid"] and from_folder["num_samples"] == 16
    res = runner.invoke(app, ["score", "--samples", str(root / "data" / "samples" / "oracle.zarr"),
                              "--reference-npz", f"judge={ref}", *common])
    assert res.exit_code == 0, res.output
    from_store = json.loads(res.stdout)
    stage = json.loads((root / "metrics" / "score" / "oracle.json").read_text())["judge"]
    for key in ("fid", "isc", "kid", "precision", "recall"):
        assert from_folder["judge"][key] == from_store["judge"][key] == stage[key]
    sampled = tmp_path / "out"  # as `rcg sample oracle --out` leaves it: the store beside its figures
    shutil.copytree(root / "data" / "samples" / "oracle.zarr", sampled / "oracle.zarr")
    (sampled / "figures" / "oracle").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(sampled / "figures" / "oracle" / "samples.png")
    res = runner.invoke(app, ["score", "--samples", str(sampled), "--reference-npz", f"judge={ref}", *common])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["judge"]["fid"] == stage["fid"] and json.loads(res.stdout)["num_samples"] == 16
    shutil.copytree(root / "data" / "samples" / "rcg.zarr", sampled / "rcg.zarr")
    res = runner.invoke(app, ["score", "--samples", str(sampled), "--reference-npz", f"judge={ref}", *common])
    assert res.exit_code == 2 and "holds 2 sample stores (oracle.zarr, rcg.zarr): give one" in res.output
    with np.load(ref) as npz:
        adm = adm_like(tmp_path / "adm.npz", npz["mu"], npz["sigma"])
    res = runner.invoke(app, ["score", "--samples", str(folder), "--reference-npz", f"judge={adm}", *common])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["judge"]["reference"] == "npz:adm" and "kid" not in json.loads(res.stdout)["judge"]
    for args, message in (
            (["--samples", str(folder), *common], "give --reference-npz FILE"),
            (["--samples", str(folder), "--reference-npz", str(adm), *common], "needs --inception-weights FILE"),
            (["--samples", str(folder), "--reference-npz", f"judge={tmp_path / 'no.npz'}", *common],
             "--reference-npz judge: file does not exist"),
            (["oracle", "--samples", str(folder)], "drop the setting 'oracle'"),
            (["oracle", "--out", str(tmp_path / "x.json")], "offline mode: add --samples PATH"),
            (["--samples", str(tmp_path / "empty"), "--reference-npz", f"judge={ref}", *common],
             "is not a sample store")):
        res = runner.invoke(app, ["score", *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "zz-small.png")
    res = runner.invoke(app, ["score", "--samples", str(folder), "--reference-npz", f"judge={ref}", *common])
    assert res.exit_code == 2 and "images of two sizes (00000.png is 16x16, zz-small.png 8x8)" in res.output


@pytest.mark.slow  # ~30 s on 2 busy CPU cores: Inception at 299 px
def test_cli_offline_score_against_adm_reference_batch(scored, tmp_path, monkeypatch):
    """The official-checkpoint evaluation: ``rcg score --samples DIR --reference-npz ADM.npz --inception-weights
    W`` gives Inception FID and IS from the npz's mu/sigma alone (its images are never read)."""
    from PIL import Image
    from typer.testing import CliRunner

    from stages.cli import app

    root = scored[0]
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults, but for --set
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(val_images(root)[:6]):
        Image.fromarray(image).save(folder / f"{i}.png")
    adm = adm_like(tmp_path / "VIRTUAL_imagenet256_labeled.npz", np.zeros(2048), np.eye(2048))
    weights = write_random_inception(tmp_path / "weights-inception.pth")
    res = CliRunner().invoke(app, ["score", "--samples", str(folder), "--reference-npz", str(adm),
                                   "--inception-weights", str(weights), "--set", "score.isc_splits=2",
                                   "--out", str(tmp_path / "scores.json")])
    assert res.exit_code == 0, res.output
    inc = json.loads((tmp_path / "scores.json").read_text())["inception"]
    assert inc["num_samples"] == 6 and inc["reference"] == "npz:VIRTUAL_imagenet256_labeled" and inc["fid"] > 0
    assert inc["isc"] >= 1 and "kid" not in inc and json.loads(res.stdout)["inception_fid"] == inc["fid"]
