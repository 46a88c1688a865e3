"""pipeline.eval.fidelity: the float64 Fréchet distance against torch-fidelity's own FID, the registered judge and
encoder extractors, the Inception path on a random-weights file in torch-fidelity's layout, reference files."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.core.artifacts import save_model_file
from pipeline.core.errors import RcgError
from pipeline.eval.fidelity import (Reference, create_extractor, raised, extract, load_reference, save_reference,
                                    score_features)
from pipeline.eval.metrics import frechet_distance, gaussian_stats
from pipeline.models.encoder import MODEL_FORMAT as ENCODER_FORMAT, MoCoViT
from pipeline.models.judge import MODEL_FORMAT as JUDGE_FORMAT, Judge

CPU = torch.device("cpu")


class Images(Dataset):
    """torch-fidelity's Dataset input: uint8 [3, H, W] items."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def images(seed: int, n: int, size: int = 16, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def batches(x: torch.Tensor, size: int):
    return (x[i:i + size] for i in range(0, len(x), size))


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Judge(img_size=16, num_classes=5, width=8, stages=2)
    path = tmp_path_factory.mktemp("judge") / "judge.pt"
    save_model_file(path, JUDGE_FORMAT, {"model": {"img_size": 16, "num_classes": 5, "width": 8, "stages": 2}},
                    model.state_dict())
    return path


def test_frechet_distance_equals_torch_fidelity_on_the_same_features():
    gen = torch.Generator().manual_seed(0)
    f1 = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    f2 = 0.7 * torch.randn(250, 12, generator=gen, dtype=torch.float64) + 0.3
    theirs = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), False)
    ours = frechet_distance(*gaussian_stats(f1.numpy()), *gaussian_stats(f2.numpy()))
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-12)
    assert ours > 0.5  # the two sets differ; the comparison is not between zeros


def test_judge_fid_from_stats_equals_calculate_metrics(judge_file):
    """The whole path: our extraction + float64 FD from (mu, sigma) == torch-fidelity's calculate_metrics FID with
    the registered judge extractor on the same images."""
    real, fake = images(1, 40), images(2, 30, low=40, high=200)
    theirs = torch_fidelity.calculate_metrics(input1=Images(fake), input2=Images(real), feature_extractor="rcg-judge",
                                              feature_extractor_weights_path=str(judge_file), fid=True, isc=True,
                                              cuda=False, cache=False, verbose=False, save_cpu_ram=True,
                                              batch_size=10, isc_splits=3)
    fe = {"judge": create_extractor("judge", judge_file, CPU)}
    f_fake = extract(fe, batches(fake, 10), CPU)["judge"]
    f_real = extract(fe, batches(real, 10), CPU)["judge"]["penultimate"]
    ref = Reference("test", *gaussian_stats(f_real.numpy()), f_real)
    ours = score_features("judge", f_fake, ref, ref, isc_splits=3, kid_subsets=10, kid_subset_size=40, prc_k=3,
                          min_samples=30, seed=2020)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["fid"] > 1e-3
    assert ours["isc"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert raised(ours) == ["kid_subset_reduced"] and ours["num_samples"] == 30 and ours["reference"] == "test"


def test_extractors_are_registered_and_take_uint8(judge_file, tmp_path):
    assert {"rcg-judge", "rcg-encoder"} <= set(FEATURE_EXTRACTORS_REGISTRY)
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, proj_hidden_dim=64, proj_dim=16)
    save_model_file(tmp_path / "encoder.pt", ENCODER_FORMAT, {"model": cfg}, MoCoViT(**cfg).state_dict())
    fe = {"judge": create_extractor("judge", judge_file, CPU), "encoder": create_extractor("encoder", tmp_path / "encoder.pt", CPU)}
    x = images(3, 6, size=24)  # any size: each extractor resizes to its own input size
    out = extract(fe, [x[:4], x[4:]], CPU)
    assert out["judge"]["penultimate"].shape == (6, 16) and out["judge"]["logits"].shape == (6, 5)
    assert out["encoder"]["rep"].shape == (6, 16)
    assert torch.allclose(out["encoder"]["rep"].std(dim=1), torch.ones(6), atol=1e-4)  # RCG's standardised rep
    with pytest.raises(ValueError, match="uint8"):
        fe["judge"](x.float())
    with pytest.raises(RcgError, match="no judge weights"):
        create_extractor("judge", tmp_path / "missing.pt", CPU)


def write_random_inception(path):
    """A random-init Inception v3 saved as torch-fidelity's converted weights file (a plain state dict)."""
    real_load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None  # keep the random init
    try:
        with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
            torch.manual_seed(0)
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        FeatureExtractorInceptionV3.load_state_dict = real_load
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


def test_inception_path_runs_on_a_random_weights_file(inception_file, tmp_path):
    fe = {"inception": create_extractor("inception", inception_file, CPU)}
    out = extract(fe, [images(4, 3, size=16)], CPU)["inception"]
    assert out["2048"].shape == (3, 2048) and out["logits_unbiased"].shape == (3, 1008)
    assert torch.isfinite(out["2048"]).all()
    bad = tmp_path / "not-inception.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, bad)
    with pytest.raises(RcgError, match="not torch-fidelity's Inception"):
        create_extractor("inception", bad, CPU)


def test_reference_npz_round_trip_and_feature_size(tmp_path):
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    save_reference(tmp_path / "r.npz", feats)
    ref = load_reference(tmp_path / "r.npz", 8, "judge", "train:50")
    mu, sigma = gaussian_stats(feats.numpy())
    assert ref.mu.dtype == np.float64 and np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    assert torch.equal(ref.features, feats) and ref.name == "train:50"
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
    adm = load_reference(tmp_path / "adm.npz", 2048, "inception")
    assert adm.features is None and adm.name == "npz:adm" and adm.sigma.dtype == np.float64
    with pytest.raises(RcgError, match="2048.*judge space has 8-d"):
        load_reference(tmp_path / "adm.npz", 8, "judge")
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    with pytest.raises(RcgError, match="needs 'mu' and 'sigma'"):
        load_reference(tmp_path / "nomu.npz", 3, "judge")


def test_adm_reference_batch_reads_only_the_statistics(tmp_path, monkeypatch):
    """ADM's VIRTUAL_imagenet256_labeled.npz holds its images (arr_0, ~2 GB) beside mu/sigma and the sFID
    statistics: only mu and sigma are read. Here arr_0 is an object array, which allow_pickle=False refuses to
    load, so any read of it fails; the spy records every key read."""
    np.savez(tmp_path / "adm.npz", arr_0=np.array([{"images": "decoy"}] * 4, dtype=object),
             mu=np.full(6, 0.5, np.float64), sigma=np.eye(6), mu_s=np.zeros(3), sigma_s=np.eye(3))
    read = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key) or real(self, key))
    ref = load_reference(tmp_path / "adm.npz", 6, "inception")
    assert sorted(read) == ["mu", "sigma"] and ref.features is None and np.array_equal(ref.mu, np.full(6, 0.5))
    feats = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    save_reference(tmp_path / "ours.npz", feats)
    read.clear()
    assert load_reference(tmp_path / "ours.npz", 6, "judge", features=False).features is None
    assert sorted(read) == ["mu", "sigma"]
    assert torch.equal(load_reference(tmp_path / "ours.npz", 6, "judge").features, feats)


def test_figures_without_reference_features_skip_kid_and_prc():
    feats = {"rep": torch.randn(20, 4, generator=torch.Generator().manual_seed(0))}
    ref = Reference("npz:x", np.zeros(4), np.eye(4), None)
    out = score_features("encoder", feats, ref, None, 10, 10, 10, 3, 100, 0)
    assert out["fd"] > 0 and "kid" not in out and "precision" not in out  # absent, not null: one row of a table
    assert raised(out) == ["few_samples", "no_reference_features"] and "isc" not in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extraction_on_gpu_matches_cpu(judge_file):
    x = images(5, 32)
    cpu = extract({"judge": create_extractor("judge", judge_file, CPU)}, [x], CPU)["judge"]
    gpu_device = torch.device("cuda")
    gpu = extract({"judge": create_extractor("judge", judge_file, gpu_device)}, [x], gpu_device)["judge"]
    assert gpu["penultimate"].device.type == "cpu"  # features always come back to the host
    assert torch.allclose(cpu["penultimate"], gpu["penultimate"], rtol=1e-3, atol=1e-4)
