import numpy as np
import pytest
import torch

from pipeline.eval.metrics import frechet_distance, frechet_distance_between, gaussian_stats, knn_precision_recall
from pipeline.eval.probes import knn_accuracy


def test_gaussian_stats_float64_unbiased():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert np.allclose(mu, x.astype(np.float64).mean(0))
    centred = x.astype(np.float64) - mu
    assert np.allclose(sigma, centred.T @ centred / 49)


def test_fd_self_is_zero_and_order_invariant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    y = rng.normal(size=(500, 8)) + 0.3
    assert abs(frechet_distance_between(x, x)) < 1e-8
    d = frechet_distance_between(x, y)
    assert d > 0.1
    assert frechet_distance_between(x[rng.permutation(500)], y[rng.permutation(500)]) == pytest.approx(d, rel=1e-9)


def test_fd_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # the same from samples: whitened samples scaled to the target moments exactly
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4000, 3))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    assert frechet_distance_between(mu1 + z * np.sqrt(v1), mu2 + z * np.sqrt(v2)) == pytest.approx(expected, rel=1e-8)


def test_fd_matches_torch_fidelity():
    fid = pytest.importorskip("torch_fidelity.metric_fid")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) * 1.5 + 0.2
    s1 = fid.fid_features_to_statistics(torch.from_numpy(a))
    s2 = fid.fid_features_to_statistics(torch.from_numpy(b))
    ref = fid.fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    assert frechet_distance_between(a, b) == pytest.approx(ref, rel=1e-10)


def _clusters(n_per, n_classes, dim, spread, rng):
    centres = rng.normal(size=(n_classes, dim)) * 10
    labels = np.repeat(np.arange(n_classes), n_per)
    return centres[labels] + rng.normal(size=(len(labels), dim)) * spread, labels


def test_knn_separated_clusters_and_queries():
    rng = np.random.default_rng(0)
    x, y = _clusters(40, 5, 16, 0.1, rng)
    assert knn_accuracy(x, y, k=10, batch=17) == 1.0
    q, qy = _clusters(10, 5, 16, 0.1, np.random.default_rng(0))  # same seed: same centres
    q = q + rng.normal(size=q.shape) * 0.05
    assert knn_accuracy(torch.from_numpy(x), torch.from_numpy(y), k=10, queries=q, query_labels=qy) == 1.0
    assert knn_accuracy(x, y, k=10, queries=q, query_labels=(qy + 1) % 5) == 0.0


def test_knn_random_labels_near_chance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32))
    y = rng.integers(0, 10, size=2000)
    assert abs(knn_accuracy(x, y, k=20, batch=512) - 0.1) < 0.03


def test_knn_leave_one_out_excludes_self():
    x = np.random.default_rng(0).normal(size=(30, 8))
    assert knn_accuracy(x, np.arange(30), k=5, batch=7) == 0.0
    # with the same points as explicit queries, self is the nearest neighbour and wins
    assert knn_accuracy(x, np.arange(30), k=5, queries=x, query_labels=np.arange(30)) == 1.0
    assert knn_accuracy(x, np.arange(30), k=100) == 0.0  # k larger than the reference set


def test_knn_precision_recall():
    g = torch.Generator().manual_seed(0)
    angle = torch.rand(1200, generator=g) * 2 * torch.pi
    ring = torch.zeros(1200, 8)
    ring[:, 0], ring[:, 1] = 4 * angle.cos(), 4 * angle.sin()  # data on a circle in 8-d
    real, same = ring[:600], ring[600:]
    p, r = knn_precision_recall(real, same, k=3, batch=128)  # blocks smaller than the sets
    assert p > 0.9 and r > 0.9
    gaussian = torch.randn(600, 8, generator=g) * real.std(0)  # the moment-matched Gaussian: off the circle
    p_g, _ = knn_precision_recall(real, gaussian, k=3)
    assert p_g < 0.5
    collapsed = real[:20].repeat(30, 1) + 0.01 * torch.randn(600, 8, generator=g)  # faithful, covering little
    p_c, r_c = knn_precision_recall(real, collapsed, k=3)
    assert p_c > 0.9 and r_c < 0.2
    assert knn_precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
