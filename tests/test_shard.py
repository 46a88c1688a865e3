"""The shard stage: exact round trips, every kind of bad input accounted for, atomic and deterministic output."""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import micro_params
from pipeline.core.errors import RcgError
from pipeline.data.images import decode_rgb, to_rgb8
from pipeline.data.shards import ShardSet, key_for
from stages import shard


def _img(mode="RGB", size=(20, 16), seed=0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _save(img, path, fmt, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def _params(tmp_path, folder, *overrides, val=None):
    sets = ["data.source=folder", f"data.folder={folder}", "data.holdout=0", "shard.workers=2", *overrides]
    if val:
        sets.append(f"data.val_folder={val}")
    return micro_params(tmp_path, sets)


def _index(tmp_path):
    return pq.read_table(tmp_path / "data/shards/index.parquet").to_pylist()


def _rejects(tmp_path):
    return {r["source"]: r["reason"] for r in pq.read_table(tmp_path / "data/shards/rejects.parquet").to_pylist()}


@pytest.fixture
def messy(tmp_path):
    """A class folder tree with every kind of trouble the issue lists, next to good images."""
    root = tmp_path / "in"
    good = {}
    good["cat/a.jpg"] = _save(_img(), root / "cat/a.jpg", "JPEG", quality=90)
    good["cat/b.png"] = _save(_img(seed=1), root / "cat/b.png", "PNG")
    good["cat/sub/deep.png"] = _save(_img(seed=2), root / "cat/sub/deep.png", "PNG")
    good["dog/gray.jpg"] = _save(_img("L", seed=3), root / "dog/gray.jpg", "JPEG")
    good["dog/cmyk.jpg"] = _save(_img("CMYK", seed=4), root / "dog/cmyk.jpg", "JPEG")
    good["dog/palette.png"] = _save(_img("P", seed=5), root / "dog/palette.png", "PNG")
    good["dog/rgba.png"] = _save(_img("RGBA", seed=6), root / "dog/rgba.png", "PNG")
    good["dog/sixteen.png"] = _save(_img("I;16", seed=7), root / "dog/sixteen.png", "PNG")
    good["dog/pic.bmp"] = _save(_img(seed=8), root / "dog/pic.bmp", "BMP")
    good["dog/spa ce ünï.dots.v2.png"] = _save(_img(seed=9), root / "dog/spa ce ünï.dots.v2.png", "PNG")
    odd = os.fsencode(str(root / "dog")) + b"/bad-\xff-name.png"
    _img(seed=10).save(open(odd, "wb"), format="PNG")
    good["dog/bad-\\xff-name.png"] = odd
    full, png = io.BytesIO(), io.BytesIO()
    _img(size=(64, 64)).save(full, format="JPEG")
    _img(size=(64, 64)).save(png, format="PNG")
    broken_idat = bytearray(png.getvalue())
    broken_idat[60:90] = b"\xff" * 30  # valid header, garbage compressed data
    bad = {
        "cat/truncated.jpg": full.getvalue()[: len(full.getvalue()) // 2],
        "cat/empty.png": b"",
        "cat/text.jpg": b"this is not an image at all",
        "cat/badheader.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "cat/corrupt.png": bytes(broken_idat),
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    _save(_img(size=(4, 4)), root / "cat/tiny.png", "PNG")
    _save(_img(size=(400, 10)), root / "cat/strip.png", "PNG")
    (root / "cat/notes.txt").write_text("hello")
    (root / "cat/.hidden.png").write_bytes(b"x")
    (root / "README").write_text("top-level file")
    os.symlink(root / "cat/loop1.png", root / "cat/loop2.png")
    os.symlink(root / "cat/loop2.png", root / "cat/loop1.png")
    os.symlink(root / "nowhere.png", root / "cat/broken.png")
    os.symlink(root / "cat", root / "cat/sub/up")  # a folder loop
    (root / "empty_class").mkdir()
    return root, good


def test_messy_folder_everything_accounted_for(tmp_path, messy):
    root, good = messy
    summary = shard.run(_params(tmp_path, root))
    train = summary["splits"]["train"]
    index, rejects = _index(tmp_path), _rejects(tmp_path)
    assert train["accepted"] + train["rejected"] == train["found"]
    assert train["accepted"] == len(index) == len(good)
    assert {r["source"] for r in index} == set(good)
    expected = {"cat/truncated.jpg": "corrupt or truncated", "cat/empty.png": "empty file",
                "cat/text.jpg": "not a decodable image", "cat/corrupt.png": "corrupt or truncated",
                "cat/badheader.png": "not a decodable image: UnidentifiedImageError: cannot identify image file data",
                "cat/tiny.png": "too small", "cat/strip.png": "extreme aspect", "cat/notes.txt": "extension",
                "cat/.hidden.png": "hidden", "README": "outside any class", "cat/loop1.png": "symlink loop",
                "cat/loop2.png": "symlink loop", "cat/broken.png": "broken symlink",
                "cat/sub/up": "symlink loop"}
    for source, fragment in expected.items():
        assert fragment in rejects[source], (source, rejects[source])
    assert len(rejects) == len(expected) == train["rejected"]
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "empty_class"]
    assert any("empty class folder: empty_class" in w for w in meta["warnings"])


def test_round_trip_pixels_keys_labels(tmp_path, messy):
    root, good = messy
    shard.run(_params(tmp_path, root))
    shards = ShardSet(tmp_path / "data/shards")
    by_source = {r["source"]: r for r in _index(tmp_path)}
    for source, path in good.items():
        row = by_source[source]
        stored = shards.read(row["idx"])
        original = Image.open(path)
        want = np.asarray(to_rgb8(original))  # each mode against its own reference: tests/test_integrity.py
        assert np.array_equal(np.asarray(decode_rgb(stored)), want), source
        assert shards.keys[row["idx"]] == row["key"]
        assert row["label"] == (0 if source.startswith("cat/") else 1)
        if source in ("cat/a.jpg", "cat/b.png"):  # 8-bit RGB JPEG/PNG are kept byte for byte
            assert stored == open(path, "rb").read()
    assert by_source["dog/sixteen.png"]["ext"] == "png"  # 16-bit was converted, not passed through


def test_shards_are_webdataset_readable_and_match_index(tmp_path, micro_shards):
    import webdataset as wds
    index = pq.read_table(micro_shards / "index.parquet").to_pylist()
    train = [r for r in index if r["split"] == "train"]
    urls = sorted(str(p) for p in micro_shards.glob("train-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in train]
    assert [int(s["cls"]) for s in samples] == [r["label"] for r in train]
    assert all(s["png"] == ShardSet(micro_shards).read(r["idx"]) for s, r in zip(samples, train))
    assert len(urls) == 3  # 48 images at 20 per shard
    with tarfile.open(urls[0]) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_builtin_run_is_deterministic(tmp_path, micro_shards):
    shard.run(micro_params(tmp_path))
    for name in ["index.parquet", "train-000000.tar", "val-000000.tar"]:
        assert (tmp_path / "data/shards" / name).read_bytes() == (micro_shards / name).read_bytes()
    assert len(ShardSet(micro_shards, "val")) == 16


def test_meta_names_each_label_by_its_folder(micro_shards):
    """meta.json's ``classes[label]`` is the folder the image came from (the built-in set included: its folders are
    sorted like any ImageFolder, so label 0 is "bar", not the first shape the generator defines)."""
    meta = json.loads((micro_shards / "meta.json").read_text())
    index = pq.read_table(micro_shards / "index.parquet").to_pylist()
    assert sorted(meta["classes"]) == meta["classes"] and len(meta["classes"]) == 10
    assert all(meta["classes"][r["label"]] == r["source"].split("/")[0] for r in index)


def test_flat_folder_resize_and_jpeg_reencode(tmp_path):
    root = tmp_path / "flat"
    _save(_img(size=(40, 30)), root / "x.png", "PNG")
    _save(_img(size=(30, 60), seed=1), root / "y.jpg", "JPEG")
    shard.run(_params(tmp_path, root, "shard.resize_short_side=16", "shard.reencode_format=jpeg"))
    rows = _index(tmp_path)
    assert [(r["width"], r["height"], r["label"], r["ext"]) for r in rows] == [(21, 16, -1, "jpg"),
                                                                               (16, 32, -1, "jpg")]


def test_val_split_and_class_mismatch(tmp_path):
    _save(_img(), tmp_path / "tr/a/1.png", "PNG")
    _save(_img(), tmp_path / "tr/b/1.png", "PNG")
    _save(_img(), tmp_path / "va/a/1.png", "PNG")
    _save(_img(), tmp_path / "va/b/1.png", "PNG")
    shard.run(_params(tmp_path, tmp_path / "tr", val=tmp_path / "va"))
    assert [r["split"] for r in _index(tmp_path)] == ["train", "train", "val", "val"]
    _save(_img(), tmp_path / "va/c/1.png", "PNG")
    with pytest.raises(RcgError, match="class folders differ"):
        shard.run(_params(tmp_path, tmp_path / "tr", val=tmp_path / "va"))


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "junk/a").mkdir(parents=True)
    (tmp_path / "junk/a/x.jpg").write_bytes(b"nope")
    with pytest.raises(RcgError, match=r"no usable image .*\(1 files found, all rejected"):
        shard.run(_params(tmp_path, tmp_path / "junk"))


def test_failed_run_leaves_previous_output_and_no_temp(tmp_path, monkeypatch, messy):
    root, _ = messy
    shard.run(_params(tmp_path, root))
    before = (tmp_path / "data/shards/index.parquet").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(shard, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        shard.run(_params(tmp_path, root))
    assert (tmp_path / "data/shards/index.parquet").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shards"]


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    _save(_img(), tmp_path / "in/a/ok.png", "PNG")
    _save(_img(), tmp_path / "in/a/locked.png", "PNG")
    real_open = open

    def guarded(path, *a, **k):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", guarded)
    summary = shard.run(_params(tmp_path, tmp_path / "in"))
    assert summary["splits"]["train"]["rejected"] == 1
    assert _rejects(tmp_path)["a/locked.png"] == "unreadable: Permission denied"


def _synthetic_index(path, rows: int, per_shard: int = 1000) -> None:
    """An index.parquet of ``rows`` train rows (no tars): what ShardSet reads at ImageNet scale, small."""
    import pyarrow as pa
    from pipeline.data.shards import INDEX_SCHEMA, key_for
    idx = np.arange(rows)
    columns = {"split": ["train"] * rows, "idx": idx, "key": [key_for(f"c/{i}.JPEG") for i in idx],
               "label": idx % 1000, "shard": [f"train-{i // per_shard:06d}.tar" for i in idx],
               "offset": idx * 1536 + 512, "nbytes": np.full(rows, 1000), "ext": ["jpg"] * rows,
               "width": np.full(rows, 256), "height": np.full(rows, 256), "sha256": ["0" * 64] * rows,
               "source": [f"n01440764/n01440764_{i}.JPEG" for i in idx]}
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=INDEX_SCHEMA), path / "index.parquet")


def test_index_is_held_in_compact_columns(tmp_path):
    """At 1.28M images a Python list per column costs ~1 GB in every loader worker; numpy columns stay near
    52 bytes a row (traced by tracemalloc: numpy buffers are, arrow's transient ones are freed)."""
    import tracemalloc
    rows = 20000
    _synthetic_index(tmp_path, rows)
    ShardSet(tmp_path)  # the first read allocates pyarrow's one-time state: not the index's cost
    tracemalloc.start()
    shards = ShardSet(tmp_path)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held / rows < 60, f"{held / rows:.0f} bytes a row"
    assert len(shards) == rows and shards.keys[123] == key_for("c/123.JPEG") and int(shards.labels[1234]) == 234
    assert shards._shard_names[shards._shard[rows - 1]] == f"train-{(rows - 1) // 1000:06d}.tar"
