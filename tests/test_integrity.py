"""Issue 24: no silent corruption, no lost store, errors that name the file.

Two runs at once, a replace that fails half-way, a deleted or damaged store chunk, a partial store whose
bookkeeping is damaged, a full disk (simulated: the writer raises ENOSPC), an output folder that is not
writable, empty and unsafe checkpoints.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner
from zarr.storage import LocalStore

from conftest import micro_params
from pipeline.core import artifacts
from pipeline.core.artifacts import atomic_dir, load_checkpoint, replace_dir, save_model_file
from pipeline.core.config import dump_yaml
from pipeline.data.describe import describe
from pipeline.core.errors import RcgError
from pipeline.core.locks import STAGE_OUTPUTS, locked_outputs, lock_path, stage_outputs
from pipeline.data.images import ImagePolicy, check_image
from pipeline.data.sample_store import SampleWriter, open_samples
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.data.stores import StoreWriter, open_store, partial_path
from pipeline.data.view_store import ViewsDataset
from pipeline.data.views import ViewRecipe
from pipeline.train.state import TrainState
from stages import cli, encode, shard
from test_encode import write_encoder

ROOT = Path(__file__).resolve().parents[1]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------ replace and locks
def test_replace_dir_puts_the_finished_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    dst, src = tmp_path / "reps.zarr", tmp_path / "reps.zarr.partial"
    dst.mkdir()
    (dst / "old").write_text("finished")
    src.mkdir()
    real, calls = os.replace, []

    def second_fails(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise FileNotFoundError(errno.ENOENT, "gone", str(a))
        real(a, b)

    monkeypatch.setattr(artifacts.os, "replace", second_fails)
    with pytest.raises(FileNotFoundError):
        replace_dir(src, dst)
    assert (dst / "old").read_text() == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reps.zarr", "reps.zarr.partial"]


HOLD = """
import sys, time
from pathlib import Path
from pipeline.core.locks import locked_outputs
with locked_outputs([Path(sys.argv[1])], "encode"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_stops_naming_the_holders_pid(tmp_path):
    store = tmp_path / "data" / "reps.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RcgError, match=f"{store} is being written by another run \\(pid {holder.pid}, rcg encode\\)"):
            with locked_outputs([store], "encode"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked_outputs([store], "encode"):  # the kernel dropped the dead holder's lock: no stale lock
        assert lock_path(store).read_text().startswith(f"{os.getpid()},")
    assert not lock_path(store).exists()


def run_cli(capsys, stage: str, params_file: Path, item: str | None = None) -> tuple[int, str]:
    try:
        cli.run_stage(stage, params_file, [], False, item)
    except typer.Exit as exc:
        return exc.exit_code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_rcg_stage_refuses_outputs_another_run_holds_before_any_work(workspace, capsys):
    params = micro_params(workspace)
    params_file = workspace / "params.yaml"
    params_file.write_text(dump_yaml(params))
    with locked_outputs([params.paths.reps], "encode"):
        code, err = run_cli(capsys, "encode", params_file)
    assert code == 2 and f"pid {os.getpid()}, rcg encode" in err and len(err.strip().splitlines()) == 1
    assert not partial_path(params.paths.reps).exists() and not params.paths.reps.exists()


def test_offline_sampling_locks_its_outputs_too(tmp_path):
    out = tmp_path / "out"
    with locked_outputs([out / "rcg.zarr"], "sample rcg --out"):
        result = CliRunner().invoke(cli.app, ["sample", "rcg", "--out", str(out), "--pixel", str(tmp_path / "p.pt"),
                                              "--tokenizer", str(tmp_path / "t.pt")])
    assert result.exit_code == 2 and f"pid {os.getpid()}, rcg sample rcg --out" in result.output


def test_an_unwritable_output_folder_stops_the_stage_before_any_work(workspace, capsys):
    params = micro_params(workspace)
    params_file = workspace / "params.yaml"
    params_file.write_text(dump_yaml(params))
    params.paths.metrics.write_text("a file where the metrics folder should be")  # unwritable even for root
    code, err = run_cli(capsys, "encode", params_file)
    assert code == 2 and f"cannot write {params.paths.metrics / 'encoder.json'}" in err
    assert f"its folder {params.paths.metrics} is not writable" in err
    assert not partial_path(params.paths.reps).exists() and not params.paths.reps.exists()
    assert not lock_path(params.paths.reps).exists()  # the locks taken before the failing one are let go


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_metrics_folder_stops_encode_before_any_work(workspace, capsys):
    params = micro_params(workspace)
    params_file = workspace / "params.yaml"
    params_file.write_text(dump_yaml(params))
    params.paths.metrics.mkdir()
    params.paths.metrics.chmod(0o555)
    try:
        code, err = run_cli(capsys, "encode", params_file)
    finally:
        params.paths.metrics.chmod(0o755)
    assert code == 2 and "not writable" in err and not params.paths.reps.exists()


def test_stage_outputs_are_dvc_yamls_outs_metrics_and_plots():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = micro_params(Path("/p"))
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        for item in [None] if "foreach" not in stage else ["an_item"]:
            declared = set()
            for kind in ("outs", "metrics", "plots"):
                for entry in body.get(kind, []):
                    path = entry if isinstance(entry, str) else next(iter(entry))
                    path = (path.replace("${paths.data}", str(params.paths.data))
                            .replace("${paths.metrics}", str(params.paths.metrics)))
                    declared.add(Path(path.replace("${item}", str(item)).replace("${key}", str(item))))
            assert set(stage_outputs(name, params.paths, item)) == declared, name
    assert set(STAGE_OUTPUTS) == set(spec["stages"])


# ------------------------------------------------------------------------------------------ store chunks
IDENTITY = {"model": "test"}


def small_store(path: Path, rows: int = 10, chunk_rows: int = 4) -> np.ndarray:
    """A finished 'reps' store of ``rows`` random rows; returns the values written."""
    values = np.random.default_rng(0).normal(size=(rows, 2, 3)).astype(np.float32)
    writer = StoreWriter(path, "reps", values.shape, "float32", chunk_rows, IDENTITY, np.arange(rows))
    for chunk in writer.pending():
        writer.write(chunk, values[writer.rows(chunk).start:writer.rows(chunk).stop])
    writer.finalize()
    return values


def test_a_deleted_chunk_is_named_when_the_store_is_opened(tmp_path):
    store = tmp_path / "reps.zarr"
    values = small_store(store)
    assert np.array_equal(open_store(store, "reps")["reps"][:], values)
    (store / "reps" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(RcgError, match=f"{store}: chunk reps/c/1/0/0 is missing"):
        open_store(store, "reps")
    info = describe(store)
    assert info["complete"] is False and "reps/c/1/0/0" in info["damage"]


def test_a_chunk_deleted_after_opening_is_an_error_not_zeros(tmp_path):
    store = tmp_path / "reps.zarr"
    small_store(store)
    reps = open_store(store, "reps")["reps"]
    (store / "reps" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(RcgError, match="chunk reps/c/2/0/0 is missing"):
        reps[8:10]


def test_a_damaged_chunk_is_named_on_read(tmp_path):
    store = tmp_path / "reps.zarr"
    small_store(store)
    chunk = store / "reps" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit flipped, same size
    chunk.write_bytes(bytes(data))
    reps = open_store(store, "reps")["reps"]
    assert reps[0:4].shape == (4, 2, 3)  # the other chunks still read
    with pytest.raises(RcgError, match=f"{store}: chunk reps/c/1/0/0 is damaged"):
        reps[:]


def test_a_partial_store_with_damaged_bookkeeping_is_discarded_and_started_over(tmp_path, capsys):
    store = tmp_path / "reps.zarr"
    values = np.ones((10, 2, 3), np.float32)
    writer = StoreWriter(store, "reps", values.shape, "float32", 4, IDENTITY, np.arange(10))
    writer.write(0, values[:4])  # then killed
    (partial_path(store) / "done" / "zarr.json").write_text("{ not json")
    writer = StoreWriter(store, "reps", values.shape, "float32", 4, IDENTITY, np.arange(10))
    assert "bookkeeping is damaged" in capsys.readouterr().err
    assert writer.pending() == [0, 1, 2]
    for chunk in writer.pending():
        writer.write(chunk, values[writer.rows(chunk).start:writer.rows(chunk).stop])
    writer.finalize()
    assert np.array_equal(open_store(store, "reps")["reps"][:], values)


# ------------------------------------------------------------------------------------------ a full disk
def test_a_full_disk_during_a_store_write_names_the_store_and_chunk(tmp_path, monkeypatch):
    store = tmp_path / "reps.zarr"
    writer = StoreWriter(store, "reps", (8, 2, 3), "float32", 4, IDENTITY, np.arange(8))
    monkeypatch.setattr(LocalStore, "set", lambda *a, **k: no_space())
    with pytest.raises(RcgError, match=f"cannot write chunk 1 of {partial_path(store)}: No space left on device"):
        writer.write(1, np.ones((4, 2, 3), np.float32))


def test_a_full_disk_during_sampling_names_the_sample_store(tmp_path, monkeypatch):
    store = tmp_path / "rcg.zarr"
    writer = SampleWriter(store, 4, (8, 8, 3), 2, IDENTITY, {"setting": "rcg"}, None, False)
    monkeypatch.setattr(LocalStore, "set", lambda *a, **k: no_space())
    with pytest.raises(RcgError, match=f"cannot write chunk 0 of {partial_path(store)}: No space left"):
        writer.write(0, np.zeros((2, 8, 8, 3), np.uint8))


def test_sample_stores_record_and_check_their_chunks(tmp_path):
    store = tmp_path / "rcg.zarr"
    writer = SampleWriter(store, 4, (8, 8, 3), 2, IDENTITY, {"setting": "rcg"}, None, False)
    for chunk in writer.pending():
        writer.write(chunk, np.full((2, 8, 8, 3), 7, np.uint8))
    writer.finalize()
    (store / "images" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(RcgError, match="chunk images/c/1/0/0/0 is missing"):
        open_samples(store)


class FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        no_space()


def test_a_full_disk_during_a_checkpoint_save_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "open", lambda *a, **k: FullDisk(), raising=False)
    model_file = tmp_path / "models" / "rdm.pt"
    with pytest.raises(RcgError, match=f"cannot write {model_file}: No space left on device"):
        save_model_file(model_file, "rcg-rdm", {}, {"w": torch.ones(3)})
    state_file = tmp_path / "state" / "train_rdm.pt"
    with pytest.raises(RcgError, match=f"cannot write {state_file}: No space left on device"):
        TrainState(state_file, {}).save(1, {"m": torch.nn.Linear(2, 2)})
    assert not model_file.exists() and list(model_file.parent.iterdir()) == []


def test_a_full_disk_while_sharding_names_the_shard_folder(tmp_path, monkeypatch):
    from pipeline.data import shards
    params = micro_params(tmp_path)
    monkeypatch.setattr(shards.ShardWriter, "add", lambda *a, **k: no_space())
    with pytest.raises(RcgError, match=f"cannot write {params.paths.shards}: No space left on device"):
        shard.run(params)
    assert not params.paths.shards.exists()


def test_an_error_about_another_file_keeps_its_own_name(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "out"):
            open(tmp_path / "missing-input")


# ------------------------------------------------------------------------------------------ checkpoints
def test_an_empty_model_file_says_it_is_empty(tmp_path):
    path = tmp_path / "encoder.pt"
    path.write_bytes(b"")
    with pytest.raises(RcgError, match=f"cannot load checkpoint {path}: the file is empty \\(0 bytes\\)"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_names_the_cause_even_when_torch_gives_none(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save({"w": torch.ones(100)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:5])  # torch raises EOFError('')
    with pytest.raises(RcgError, match=f"cannot load checkpoint {path}: EOFError \\(no message\\) \\(the file is "
                                       "damaged or not a PyTorch checkpoint\\)"):
        load_checkpoint(path)


class NotAllowed:
    pass


def test_the_weights_only_refusal_is_one_whole_sentence(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": NotAllowed()}, path)
    with pytest.raises(RcgError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message == (f"cannot load checkpoint {path}: it holds an object of type test_integrity.NotAllowed, which "
                       "weights_only loading refuses (only tensors, containers and allow-listed types are "
                       "unpickled; the file was not loaded)")


# ------------------------------------------------------------------------------------------ image modes
def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def png_rgb16(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = values.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def tiff_rgb16(values: np.ndarray) -> bytes:
    """A 16-bit RGB TIFF, one uncompressed strip (PIL cannot write one)."""
    h, w, _ = values.shape
    data = values.astype("<u2").tobytes()
    entries = [(256, w), (257, h), (258, None), (259, 1), (262, 2), (273, None), (277, 3), (278, h), (279, len(data)),
               (284, 1)]
    bits_at = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, value in entries:
        if tag == 258:
            out += struct.pack("<HHII", tag, 3, 3, bits_at)
        elif tag in (273, 279):
            out += struct.pack("<HHII", tag, 4, 1, bits_at + 6 if tag == 273 else value)
        else:
            out += struct.pack("<HHIHH", tag, 3, 1, value, 0)
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb * a + 255 * (1 - a))


RNG = np.random.default_rng(24)
GRAY = RNG.integers(0, 256, (16, 12)).astype(np.uint8)
ALPHA = RNG.integers(0, 256, (16, 12)).astype(np.uint8)
RGB = RNG.integers(0, 256, (16, 12, 3)).astype(np.uint8)
DEEP = RNG.integers(0, 65536, (16, 12)).astype(np.uint16)
DEEP_RGB = RNG.integers(0, 65536, (16, 12, 3)).astype(np.uint16)
CMYK = RNG.integers(0, 256, (16, 12, 4)).astype(np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
INDEX = RNG.integers(0, 8, (16, 12)).astype(np.uint8)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    return np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1).round().clip(0, 255)


def gray3(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, -1)


def palette_case() -> tuple[bytes, np.ndarray]:
    img = Image.fromarray(INDEX, "P")
    img.putpalette(PALETTE.tobytes())
    expected = PALETTE[INDEX].astype(np.float64)
    expected[INDEX == 3] = 255  # index 3 is transparent: the viewer's white shows through
    return encoded(img, "PNG", transparency=3), expected


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    data = encoded(Image.fromarray(RGB), "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return data, np.rot90(stored, k=-1)


MODE_CASES = {  # name: (file bytes, the RGB a viewer shows, tolerance)
    "1": lambda: (encoded(Image.fromarray(GRAY > 127), "PNG"), gray3((GRAY > 127) * 255), 0),
    "L": lambda: (encoded(Image.fromarray(GRAY), "PNG"), gray3(GRAY), 0),
    "LA": lambda: (encoded(Image.fromarray(np.stack([GRAY, ALPHA], -1), "LA"), "PNG"),
                   on_white(gray3(GRAY), ALPHA), 1),
    "P with transparency": lambda: (*palette_case(), 0),
    "RGBA": lambda: (encoded(Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), "RGBA"), "PNG"),
                     on_white(RGB.astype(np.float64), ALPHA), 1),
    "I;16 (16-bit gray PNG)": lambda: (encoded(Image.fromarray(DEEP), "PNG"), gray3(np.round(DEEP / 257)), 0),
    "I;16B (big-endian TIFF)": lambda: (encoded(Image.frombytes("I;16B", (12, 16), DEEP.astype(">u2").tobytes()),
                                                "TIFF"), gray3(np.round(DEEP / 257)), 0),
    "I (32-bit TIFF)": lambda: (encoded(Image.fromarray(DEEP.astype(np.int32)), "TIFF"),
                                gray3(np.round(DEEP / 257)), 0),
    "F (float TIFF, 0..1)": lambda: (encoded(Image.fromarray((DEEP / 65535).astype(np.float32)), "TIFF"),
                                     gray3(np.round(DEEP / 257)), 0),
    "CMYK": lambda: (encoded(Image.fromarray(CMYK, "CMYK"), "TIFF"),
                     np.round((255 - CMYK[..., :3].astype(np.float64)) * (255 - CMYK[..., 3:]) / 255), 1),
    "YCbCr": lambda: (encoded(Image.fromarray(RGB, "YCbCr"), "TIFF"), ycbcr_to_rgb(RGB), 1),
    "16-bit RGB PNG": lambda: (png_rgb16(DEEP_RGB), np.round(DEEP_RGB / 257), 1),
    "16-bit RGB TIFF": lambda: (tiff_rgb16(DEEP_RGB), np.round(DEEP_RGB / 257), 1),
    "EXIF-rotated JPEG": lambda: (*exif_rotated_jpeg(), 0),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_becomes_the_rgb_a_viewer_shows(case):
    data, expected, tolerance = MODE_CASES[case]()
    accepted = check_image(data, ImagePolicy())
    assert not isinstance(accepted, str), accepted
    got = np.asarray(Image.open(io.BytesIO(accepted.data)), dtype=np.float64)
    assert got.shape == expected.shape and (accepted.width, accepted.height) == (got.shape[1], got.shape[0])
    assert np.abs(got - expected).max() <= tolerance, case


def test_a_sixteen_bit_png_keeps_its_brightness():
    """The issue's probe: a 16-bit gray PNG spanning 0..65416 stored with mean ~253 and 99% of pixels at 255."""
    ramp = np.linspace(0, 65416, 64 * 64).reshape(64, 64).astype(np.uint16)
    stored = np.asarray(Image.open(io.BytesIO(check_image(encoded(Image.fromarray(ramp), "PNG"), ImagePolicy()).data)))
    assert abs(stored.mean() - ramp.mean() / 257) < 0.5 and (stored == 255).mean() < 0.01


# ------------------------------------------------------------------------------------------ shard bit rot
def damage_sample(shards_dir: Path, row: int, flip: bool) -> dict:
    """Flip one bit in train row ``row``'s image inside its tar (or, with ``flip`` False, zero its bytes and fix
    the index's sha256 so that only the decode can fail); returns the row."""
    index = pq.read_table(shards_dir / INDEX_FILE)
    rows = index.to_pylist()
    target = [r for r in rows if r["split"] == "train"][row]
    tar = shards_dir / target["shard"]
    data = bytearray(tar.read_bytes())
    start, stop = target["offset"], target["offset"] + target["nbytes"]
    if flip:
        data[(start + stop) // 2] ^= 0x01
    else:
        data[start:stop] = bytes(stop - start)
        target["sha256"] = hashlib.sha256(bytes(stop - start)).hexdigest()
        pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), shards_dir / INDEX_FILE)
    tar.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("workers", [0, 1])
def test_a_flipped_bit_in_a_shard_stops_encode_naming_shard_and_sample(workspace, workers):
    params = micro_params(workspace, [f"encode.workers={workers}"])
    write_encoder(params)
    target = damage_sample(params.paths.shards, 5, flip=True)
    with pytest.raises(RcgError) as err:
        encode.run(params)
    assert str(err.value) == (f"{params.paths.shards / target['shard']}, sample 5 (key {target['key']}): the image "
                              "bytes differ from the sha256 in index.parquet (the shard is damaged); rerun rcg shard")


def test_an_undecodable_image_names_shard_and_sample(micro_shards, tmp_path):
    shards_dir = tmp_path / "shards"
    shutil.copytree(micro_shards, shards_dir)
    target = damage_sample(shards_dir, 7, flip=False)
    dataset = ViewsDataset(ShardSet(shards_dir), ViewRecipe(count=2, resize=16, crop=16))
    assert dataset[6].shape == (2, 16, 16, 3)
    with pytest.raises(RcgError, match=f"{shards_dir / target['shard']}, sample 7 \\(key {target['key']}\\): cannot "
                                       "decode the image"):
        dataset[7]
