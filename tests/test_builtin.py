"""The built-in dataset: deterministic by seed, balanced, labelled by shape."""

import hashlib

import numpy as np

from pipeline.data.synthetic import CLASSES, render, write_builtin


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))).hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = write_builtin(tmp_path / "a", "train", 30, 16, seed=3)
    b = write_builtin(tmp_path / "b", "train", 30, 16, seed=3)
    c = write_builtin(tmp_path / "c", "train", 30, 16, seed=4)
    assert _digest(a) == _digest(b) != _digest(c)


def test_layout_is_balanced_imagefolder(tmp_path):
    out = write_builtin(tmp_path, "val", 40, 24, seed=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)
    assert {len(list((out / c).glob("*.png"))) for c in CLASSES} == {4}


def test_images_vary_within_a_class_and_differ_across_classes():
    imgs = [np.asarray(render(0, np.random.default_rng([0, 0, i]), 32), dtype=float) for i in range(2)]
    assert imgs[0].shape == (32, 32, 3) and np.abs(imgs[0] - imgs[1]).mean() > 5
    # Same randomness, different shape: the pixels differ where the shape is.
    a = np.asarray(render(0, np.random.default_rng(7), 32), dtype=float)
    b = np.asarray(render(4, np.random.default_rng(7), 32), dtype=float)
    assert np.abs(a - b).mean() > 1


def test_pool_does_not_change_the_bytes(tmp_path):
    import multiprocessing as mp
    with mp.get_context("fork").Pool(2) as pool:
        a = write_builtin(tmp_path / "a", "train", 25, 16, seed=1, pool=pool)
    b = write_builtin(tmp_path / "b", "train", 25, 16, seed=1)
    assert _digest(a) == _digest(b)
