"""Sampling: the sample store contract, figures, RCG's two passes (determinism, rank split, conditioning),
the sample stage, editing, and the bad-input checks. Every model is micro-sized and built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import SampleSetting
from pipeline.core.errors import RcgError
from pipeline.data.sample_store import SampleWriter, open_samples
from pipeline.gen import figures as fig
from conftest import micro_params


# ------------------------------------------------------------------------------------------- store
def _write_store(path, m=10, chunk=4, rep_dim=3, labels=True, chunks=None):
    w = SampleWriter(path, m, (8, 8, 3), chunk, {"x": 1}, {"setting": "t", "models": {"pixel": "ab"},
                                                              "seeds": {"seed": 0}}, rep_dim, labels)
    for c in (w.pending() if chunks is None else chunks):
        r = w.rows(c)
        images = np.full((len(r), 8, 8, 3), c, dtype=np.uint8)
        w.write(c, images, np.full((len(r), rep_dim), c, np.float32) if rep_dim else None,
                np.arange(r.start, r.stop) if labels else None)
    return w


def test_store_contract_and_resume(tmp_path):
    path = tmp_path / "s.zarr"
    w = _write_store(path, chunks=[0, 2])
    with pytest.raises(RcgError, match="still missing"):
        w.finalize()
    w = SampleWriter(path, 10, (8, 8, 3), 4, {"x": 1}, {}, 3, True)  # same identity: resumed
    assert w.pending() == [1] and w.pending(0, 2) == [1] and w.pending(1, 2) == []
    _write_store(path, chunks=[1]).finalize()
    s = open_samples(path)
    assert s.images.dtype == np.uint8 and s.images.shape == (10, 8, 8, 3) and len(s) == 10
    assert s.reps.dtype == np.float32 and s.reps.shape == (10, 3)
    assert s.labels.dtype == np.int64 and s.labels[:].tolist() == list(range(10))
    assert s.images[5, 0, 0, 0] == 1 and s.attrs["setting"] == "t" and s.attrs["models"] == {"pixel": "ab"}
    assert s.attrs["seeds"] == {"seed": 0} and s.attrs["complete"]


def test_store_refuses_other_identity_and_wrong_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path, chunks=[0])
    w = SampleWriter(path, 10, (8, 8, 3), 4, {"x": 2}, {}, None, False)  # other inputs: started afresh
    assert w.pending() == [0, 1, 2] and "reps" not in w.group and "labels" not in w.group
    with pytest.raises(RcgError, match="conditioning"):
        w.write(0, np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 3), np.float32))
    with pytest.raises(RcgError, match="uint8"):
        w.write(0, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(RcgError, match="incomplete"):
        open_samples(path.with_name("s.zarr.partial"))


# ------------------------------------------------------------------------------------------ figures
def test_figure_layouts(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    g = fig.grid(imgs, 3, cell=8)  # 2 rows of 3 cells of 8 px (upscaled x2), pad 2
    assert g.shape == (2 + 2 * 10, 2 + 3 * 10, 3)
    assert (g[2:10, 2:10] == imgs[0].repeat(2, 0).repeat(2, 1)).all()
    assert (g[12:20, 22:30] == 255).all()  # the padded sixth cell
    b = fig.beside(imgs[:2], np.stack([imgs[:3], imgs[1:4]]), last=imgs[3:5])
    assert b.shape == (2 + 2 * 6, 2 + 5 * 6 + 2 * fig.GAP, 3)
    assert (b[2:6, 2:6] == imgs[0]).all() and (b[8:12, -6:-2] == imgs[4]).all()
    r = fig.interleave(imgs[:4], imgs[1:5], 2)
    assert r.shape == (2 + 2 * 6, 2 + 4 * 6, 3) and (r[2:6, 8:12] == imgs[1]).all()
    path = fig.save_png(tmp_path / "f" / "g.png", g)
    assert (np.asarray(Image.open(path)) == g).all()
    with pytest.raises(RcgError, match="uint8"):
        fig.tile(np.zeros((1, 1, 4, 4, 3), np.float32))


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, fragment", [
    ("sample.settings.rcg.guidance=-1", "guidance"),
    ("sample.settings.rcg.temperature=-0.5", "temperature"),
    ("sample.settings.rcg.iterations=0", "iterations"),
    ("sample.settings.baseline.reps=rdm", "reps"),
    ("sample.settings.oracle.reps=null", "reps"),
    ("sample.settings.baseline.classes=[1]", "classes"),
])
def test_bad_settings_name_the_key(tmp_path, override, fragment):
    with pytest.raises(RcgError, match="invalid params") as err:
        micro_params(tmp_path, [override])
    assert fragment in str(err.value) and "sample.settings." in str(err.value)
