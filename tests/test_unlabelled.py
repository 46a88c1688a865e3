"""A user's own images without labels (issue 23): data.labels, the seeded held-out split, class folders that lose
every file, label-based rows refused before any work, the ssl_judge space, the real row, and a micro ``dvc repro``
of a flat folder of mixed sizes and formats to the comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import micro_params
from pipeline.core.artifacts import load_model
from pipeline.core.errors import RcgError
from pipeline.data.synthetic import write_builtin
from pipeline.eval.fidelity import EXTRACTOR_NAMES, create_extractor
from pipeline.models.ssl_judge import SslJudgeNet, SslJudgeViT, build_ssl_judge, resized_crops
from stages import reference, score, shard, train_judge, train_ssl_judge
from test_dvc import _dvc, _project, _ran


def flat_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` built-in images in one folder (no class folders), each resized to its own size and saved as PNG or
    JPEG: what a user's collection looks like."""
    rng = np.random.default_rng(seed)
    out = root / "images"
    out.mkdir(parents=True)
    for i, png in enumerate(sorted(write_builtin(root / "src", "train", count, 32, seed).rglob("*.png"))):
        w, h = (int(v) for v in rng.integers(16, 48, 2))
        img = Image.open(png).convert("RGB").resize((w, h), Image.BICUBIC)
        img.save(out / f"img{i:03d}.jpg", quality=92) if i % 3 == 0 else img.save(out / f"img{i:03d}.png")
    return out


def _index(params) -> list[dict]:
    return pq.read_table(params.paths.shards / "index.parquet").to_pylist()


def _meta(params) -> dict:
    return json.loads((params.paths.shards / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------- shards
def test_a_flat_folder_gives_up_a_seeded_held_out_split(tmp_path):
    images = flat_folder(tmp_path, 20)
    params = micro_params(tmp_path / "a", ["data.source=folder", f"data.folder={images}", "data.holdout=0.25"])
    summary = shard.run(params)
    assert summary["labels"] is False and summary["splits"]["val"]["accepted"] == 5
    assert summary["splits"]["train"]["accepted"] == 15
    meta, rows = _meta(params), _index(params)
    assert meta["labels"] is False and meta["splits"]["val"]["held_out"] == {"fraction": 0.25, "seed": 0}
    val = sorted(r["source"] for r in rows if r["split"] == "val")
    assert not set(val) & {r["source"] for r in rows if r["split"] == "train"} and all(r["label"] == -1 for r in rows)
    again = micro_params(tmp_path / "b", ["data.source=folder", f"data.folder={images}", "data.holdout=0.25"])
    shard.run(again)
    assert sorted(r["source"] for r in _index(again) if r["split"] == "val") == val  # seeded: the same draw
    other = micro_params(tmp_path / "c", ["data.source=folder", f"data.folder={images}", "data.holdout=0.25", "seed=1"])
    shard.run(other)
    assert sorted(r["source"] for r in _index(other) if r["split"] == "val") != val


def test_labels_none_walks_class_folders_as_plain_folders(tmp_path):
    classes = write_builtin(tmp_path / "src", "train", 12, 16, 0)
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={classes}", "data.labels=none",
                                     "data.holdout=0", "score.spaces=[encoder]", "score.label_spaces=[]", "score.ssl_spaces=[]"])
    summary = shard.run(params)
    assert summary["labels"] is False and summary["splits"]["train"]["accepted"] == 12
    assert _meta(params)["classes"] == [] and all(r["label"] == -1 for r in _index(params))
    with pytest.raises(RcgError, match="train_judge: the training images have no labels"):
        train_judge.run(params)


def test_labels_folders_refuses_a_flat_folder(tmp_path):
    images = flat_folder(tmp_path, 4)
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={images}", "data.labels=folders"])
    with pytest.raises(RcgError, match="data.labels is 'folders' but the folder has no class subfolders"):
        shard.run(params)


def test_a_class_folder_whose_every_file_is_rejected_is_reported(tmp_path, capsys):
    classes = write_builtin(tmp_path / "src", "train", 20, 16, 0)
    lost = sorted(p for p in classes.iterdir() if p.is_dir())[1]
    for png in lost.iterdir():
        png.write_bytes(b"not an image")
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={classes}", "data.holdout=0"])
    shard.run(params)
    meta = _meta(params)
    assert meta["classes_without_images"] == [{"split": "train", "class": lost.name, "label": 1}]
    assert f"class folder {lost.name} (label 1): every file was rejected" in capsys.readouterr().err
    assert 1 not in {r["label"] for r in _index(params)}


# ---------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("overrides, message", [
    (["data.labels=none"], "score.label_spaces: judge trains on labels, but data.labels is none"),
    (["data.labels=none", "score.spaces=[encoder]", "score.label_spaces=[]", "score.ssl_spaces=[]",
      "pixel.conditionings=[rep,class]"],
     "pixel.conditionings: class needs labels, but data.labels is none"),
    (["score.spaces=[encoder]"], r"score.label_spaces: must list the label spaces of score.spaces \(\[\]\)"),
    (["score.label_spaces=[]"], r"score.label_spaces: must list the label spaces of score.spaces \(\['judge'\]\)"),
    (["score.spaces=[judge,encoder]"],
     r"score.ssl_spaces: must list the self-supervised spaces of score.spaces \(\[\]\), which train_ssl_judge"),
    (["sample.settings.real.generator=none"], "sample.settings.real: the name of compare's held-out row"),
    (["score.spaces=[judge,encoder,judge]"], "score.spaces: a space is listed twice"),
])
def test_label_rows_on_unlabelled_data_are_one_line_before_any_work(tmp_path, overrides, message):
    with pytest.raises(RcgError, match=message):
        micro_params(tmp_path, overrides)


def test_too_few_images_to_hold_any_out_is_one_line(tmp_path):
    images = flat_folder(tmp_path, 1)
    with pytest.raises(RcgError, match="data.holdout: 1 image file\\(s\\) found, too few to hold any out"):
        shard.run(micro_params(tmp_path, ["data.source=folder", f"data.folder={images}"]))


def test_the_real_row_needs_a_val_split_and_a_space_needs_listing(tmp_path):
    images = flat_folder(tmp_path, 6)
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={images}", "data.holdout=0",
                                     "score.spaces=[encoder]", "score.label_spaces=[]", "score.ssl_spaces=[]"])
    shard.run(params)
    with pytest.raises(RcgError, match="score real: .* has no val split to score as the real row"):
        score.run(params, "real")
    with pytest.raises(RcgError, match="reference: 'ssl_judge' is not a scored space"):
        reference.run(params, "ssl_judge")


# ------------------------------------------------------------------------------------------- ssl_judge
def test_resized_crops_at_full_scale_and_square_aspect_are_the_images():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    same = resized_crops(images, 1.0, torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    assert torch.equal(same, images)
    cropped = resized_crops(images, 0.3, torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8 and not torch.equal(cropped, images)


def test_ssl_judge_trains_without_labels_and_registers_with_torch_fidelity(workspace):
    params = micro_params(workspace)
    summary = train_ssl_judge.run(params)
    metrics = json.loads((params.paths.metrics / "ssl_judge.json").read_text())
    assert metrics["labelled"] and metrics["knn_split"] == "val" and 0 <= metrics["knn_top1"] <= 1
    assert summary["knn_top1"] == metrics["knn_top1"] and metrics["steps"] == 6  # 2 epochs of 48 / 16
    model, payload = load_model("ssl_judge", params.paths.models / "ssl_judge.pt")
    assert payload["config"]["model"]["img_size"] == 16 and model.feature_dim == 16
    extractor = create_extractor("ssl_judge", params.paths.models / "ssl_judge.pt", torch.device("cpu"))
    assert extractor.get_name() == EXTRACTOR_NAMES["ssl_judge"] == "rcg-ssl-judge"
    (feats,) = extractor(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert feats.shape == (2, 16)


def test_ssl_judge_is_the_other_family_than_the_encoder(workspace):
    """``ssl_judge.model.arch: auto`` trains a ViT beside a ResNet encoder (a CNN beside a ViT, as above), so the
    label-free space is another architecture than the conditioning one; the file says which and loads back as it.
    A file written before ``arch`` existed loads as the CNN; a patch size the crop does not divide is refused."""
    vit = ["ssl_judge.model.vit.embed_dim=16", "ssl_judge.model.vit.depth=1", "ssl_judge.model.vit.patch_size=8"]
    assert micro_params(workspace).ssl_judge_arch() == "cnn"
    params = micro_params(workspace, ["encoder.model.arch=resnet", *vit])
    assert params.ssl_judge_arch() == "vit"
    assert micro_params(workspace, ["encoder.model.arch=resnet", "ssl_judge.model.arch=cnn"]).ssl_judge_arch() == "cnn"
    train_ssl_judge.run(params)
    assert json.loads((params.paths.metrics / "ssl_judge.json").read_text())["arch"] == "vit"
    model, payload = load_model("ssl_judge", params.paths.models / "ssl_judge.pt")
    assert isinstance(model, SslJudgeViT) and payload["config"]["model"]["arch"] == "vit" and model.feature_dim == 16
    assert not model.vit.patch_embed.proj.weight.requires_grad  # MoCo v3's frozen random patch projection
    (feats,) = create_extractor("ssl_judge", params.paths.models / "ssl_judge.pt",
                                torch.device("cpu"))(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert feats.shape == (2, 16)

    old = build_ssl_judge({"img_size": 16, "width": 8, "stages": 2, "proj_hidden_dim": 32, "proj_dim": 16})
    assert isinstance(old, SslJudgeNet) and old.feature_dim == 16
    with pytest.raises(RcgError, match=r"ssl_judge.model.vit.patch_size \(6\) must divide views.crop \(16\)"):
        micro_params(workspace, ["encoder.model.arch=resnet", "ssl_judge.model.vit.patch_size=6"])


def test_an_unlisted_space_builds_no_model(tmp_path):
    """The graph DVC resolves from the params: with only the encoder space (ImageNet's presets score so, with
    Inception beside it), no judge of either kind is trained and no reference is made for them."""
    import shutil

    from dvc.repo import Repo

    from pipeline.core.config import dump_yaml
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "dvc.yaml", tmp_path)
    params = micro_params(Path("."), ["score.spaces=[encoder]", "score.label_spaces=[]", "score.ssl_spaces=[]"])
    (tmp_path / "params.yaml").write_text(dump_yaml(params))
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        names = {stage.addressing.rpartition(":")[2] for stage in repo.index.stages}
    assert "reference@encoder" in names and "score_real" in names
    assert not {n for n in names if n.startswith(("train_judge", "train_ssl_judge", "reference@judge",
                                                  "reference@ssl_judge"))}, names


# ------------------------------------------------------------------------------------------- dvc repro
@pytest.mark.integration
def test_dvc_repro_on_a_flat_folder_of_mixed_images_without_labels(tmp_path):
    """No labels anywhere: no train_judge instance, no judge reference; the encoder and ssl_judge spaces score
    every setting and the real row (the held-out quarter of the folder)."""
    images = flat_folder(tmp_path / "user", 36)
    proj = _project(tmp_path / "project", ["data.source=folder", f"data.folder={images}", "data.holdout=0.25",
                                           "score.spaces=[encoder,ssl_judge]", "score.label_spaces=[]"])
    out = _dvc(proj, "repro")
    ran = _ran(out)
    assert not {s for s in ran if s.startswith("train_judge")} and "reference@judge" not in ran
    assert {"train_ssl_judge@ssl_judge", "reference@encoder", "reference@ssl_judge", "score_real", "compare"} <= ran
    assert not (proj / "data" / "models" / "judge.pt").exists()
    table = json.loads((proj / "metrics" / "compare.json").read_text())
    assert table["headline"] == "ssl_judge" and set(table) == {"headline", "baseline", "rcg", "rcg_cfg", "oracle",
                                                                "real"}
    assert table["real"]["num_samples"] == 9 and all("ssl_fd" in row and "rep_fd" in row and "judge_fid" not in row
                                                     for name, row in table.items() if name != "headline")
    md = (proj / "metrics" / "compare.md").read_text()
    assert "| real |" in md and "ssl FD" in md and "rep FD" in md and "judge FID" not in md
    ssl = json.loads((proj / "metrics" / "ssl_judge.json").read_text())
    assert ssl == {**ssl, "labelled": False} and "knn_top1" not in ssl

    # the folder is a param, so DVC sees its name only: the scan stage's listing makes its contents a dependency
    assert _ran(_dvc(proj, "repro", "shard")) == {"scan"}  # untouched: the listing is checked, nothing reruns
    found = lambda: sum(split["found"] for split in  # noqa: E731  (images in both splits)
                        json.loads((proj / "data" / "shards" / "meta.json").read_text())["splits"].values())
    before = found()
    sorted(images.iterdir())[0].unlink()  # the user deletes one image
    assert _ran(_dvc(proj, "repro", "shard")) == {"scan", "shard"}
    assert found() == before - 1
