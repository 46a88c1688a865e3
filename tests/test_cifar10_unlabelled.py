"""The CIFAR-10 test split as a user's unlabelled collection (issue 23): its JPEGs moved into one flat folder under
new names (no class folders, no class in the names), then the CPU preset (``cifar10_cpu`` with ``data.labels:
none``, a held-out tenth and label-free scoring) through ``dvc repro`` to the comparison table. Slow: 11 min on 2
CPU cores (678 s at 51c80e6); it needs ``../shared/datasets/cifar10/test.tar`` and skips without it."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.core.config import Params, dump_yaml, load_params, preset
from test_dvc import _dvc, _project, _ran

CIFAR10_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "test.tar"
IMAGES: int | None = None  # all 10,000 images of the split; a count takes that many, evenly over the sorted files

# cifar10_cpu on a folder without labels: the held-out split comes from the folder, and no space needs labels.
UNLABELLED = ["data.val_folder=null", "data.labels=none", "data.holdout=0.1", "score.spaces=[ssl_judge, encoder]",
              "score.label_spaces=[]", "score.ssl_spaces=[ssl_judge]"]


def flat_cifar10_test(out: Path, count: int | None = None) -> Path:
    """The test split's JPEG files in one folder ``out`` as 00000.jpg, 00001.jpg, ...: what a user's flat folder
    of unlabelled images looks like. ``count``: that many, evenly spaced over the sorted members (every class)."""
    out.mkdir(parents=True)
    with tarfile.open(CIFAR10_TEST) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")),
                         key=lambda m: m.name)
        if count is not None:
            members = [members[i * len(members) // count] for i in range(count)]
        for i, member in enumerate(members):
            (out / f"{i:05d}.jpg").write_bytes(tar.extractfile(member).read())
    return out


def unlabelled_params(images: Path) -> Params:
    """The CPU preset on ``images`` (a flat folder), labels dropped, scored in ssl_judge and encoder."""
    return preset("cifar10_cpu", [f"data.folder={images}", *UNLABELLED])


def check_unlabelled_run(proj: Path, out: str) -> None:
    """No label judge anywhere; the table has every setting and the real row (the held-out images, as many as a
    setting's samples at most), each scored in the ssl_judge's and the encoder's space."""
    params = load_params(proj / "params.yaml")
    ran = _ran(out)
    assert not {s for s in ran if s.startswith("train_judge")} and "reference@judge" not in ran, ran
    assert {"shard", "train_ssl_judge@ssl_judge", "reference@ssl_judge", "reference@encoder", "score_real",
            "compare"} <= ran, ran
    assert not (proj / "data" / "models" / "judge.pt").exists()
    meta = json.loads((proj / "data" / "shards" / "meta.json").read_text())
    assert meta["labels"] is False and meta["splits"]["val"]["held_out"]["fraction"] == params.data.holdout
    index = pq.read_table(proj / "data" / "shards" / "index.parquet").to_pylist()
    assert all(row["label"] == -1 for row in index)
    val = sum(row["split"] == "val" for row in index)
    table = json.loads((proj / "metrics" / "compare.json").read_text())
    assert table["headline"] == "ssl_judge"
    assert set(table) == {"headline", "baseline", "rcg", "rcg_cfg", "oracle", "real"}, set(table)
    assert table["real"]["num_samples"] == min(val, params.sample.num_samples)
    rows = {name: row for name, row in table.items() if name != "headline"}
    assert all("ssl_fd" in row and "rep_fd" in row and "judge_fid" not in row for row in rows.values()), rows
    md = (proj / "metrics" / "compare.md").read_text()
    assert "| real |" in md and "ssl FD" in md and "rep FD" in md and "judge FID" not in md


def test_the_unlabelled_cpu_params_validate(tmp_path):
    """What the slow test runs is valid params without the data set: no label space, the folder's own val split."""
    p = unlabelled_params(tmp_path)
    assert p.data.labels == "none" and p.data.val_folder is None and p.data.holdout == 0.1
    assert p.score.label_spaces == [] and p.score.spaces == ["ssl_judge", "encoder"]
    assert p.encoder.model == preset("cifar10_cpu").encoder.model  # the CPU preset's models, unchanged


@pytest.mark.slow
@pytest.mark.integration
def test_cifar10_test_split_without_labels_through_the_cpu_preset(tmp_path):
    if not CIFAR10_TEST.is_file():
        pytest.skip(f"no CIFAR-10 test split at {CIFAR10_TEST}")
    images = flat_cifar10_test(tmp_path / "images", IMAGES)
    assert not [p for p in images.iterdir() if p.is_dir()]
    proj = _project(tmp_path / "project")
    (proj / "params.yaml").write_text(dump_yaml(unlabelled_params(images)))
    out = _dvc(proj, "repro", timeout=4 * 3600)
    check_unlabelled_run(proj, out)
