"""pipeline.eval.fidelity: the float64 Fréchet distance against torch-fidelity's own FID, the registered judge and
encoder extractors, the Inception path on a random-weights file in torch-fidelity's layout, the DINOv2 path on a
random-weights file in timm's layout, reference files."""

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


SMALL_DINOV2 = "vit_small_patch14_dinov2"  # the ViT-L/14 layout at 384-d, 12 blocks (~22M parameters)


def write_random_dinov2(path, arch: str = SMALL_DINOV2):
    """A random-init DINOv2 ViT in timm's layout, saved as the user's weights file is (torch.save(state_dict)).
    Its layer scales are set to 1 (DINOv2 initialises them at 1e-5, which leaves every image the same CLS token),
    so that different images give different features."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    return write_random_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_timm.pth")


def test_dinov2_extractor_on_a_random_weights_file(dinov2_file, tmp_path):
    """The registered rcg-dinov2 extractor: uint8 at any size -> 224 px -> the final norm's CLS token; FD, KID
    and precision/recall through score_features like every space."""
    fe = {"dinov2": create_extractor("dinov2", dinov2_file, CPU, SMALL_DINOV2)}
    assert fe["dinov2"].get_name() == "rcg-dinov2" and "rcg-dinov2" in FEATURE_EXTRACTORS_REGISTRY
    x = images(5, 6, size=16)
    out = extract(fe, batches(x, 4), CPU)["dinov2"]
    assert out["cls"].shape == (6, 384) and torch.isfinite(out["cls"]).all()
    model = fe["dinov2"].model
    with torch.no_grad():  # by hand: resize, ImageNet mean/std, CLS of forward_features (final norm applied)
        y = torch.nn.functional.interpolate(x.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
        y = (y.clamp(0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        assert torch.allclose(out["cls"], model.forward_features(y)[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        fe["dinov2"](x.float())
    real = extract(fe, [images(6, 8, size=16)], CPU)["dinov2"]["cls"]
    dark = extract(fe, [images(7, 6, size=16, high=40)], CPU)["dinov2"]
    ref = Reference("train:8", *gaussian_stats(real.numpy()), real)
    figures = score_features("dinov2", out, ref, ref, 2, 2, 4, 2, 4, 0)
    assert np.isfinite(figures["fd"]) and figures["fd"] > 0 and "isc" not in figures
    assert figures["kid"] is not None and 0 <= figures["precision"] <= 1
    assert score_features("dinov2", dark, ref, ref, 2, 2, 4, 2, 4, 0)["fd"] > 2 * figures["fd"]


def test_dinov2_weights_that_do_not_fit_are_one_line_naming_the_file(dinov2_file, tmp_path):
    sd = torch.load(dinov2_file, weights_only=True)
    renamed = tmp_path / "renamed.pth"
    torch.save({k.replace("blocks.", "layers."): v for k, v in sd.items()}, renamed)
    other = tmp_path / "other-arch.pth"
    torch.save({**sd, "cls_token": torch.zeros(1, 1, 1024)}, other)
    not_sd = tmp_path / "not-a-state-dict.pth"
    torch.save([1, 2, 3], not_sd)
    for path, match in ((renamed, "missing keys .*unexpected keys"), (other, r"shapes differ \(e.g. cls_token"),
                        (not_sd, "not a state dict")):
        with pytest.raises(RcgError, match=match) as err:
            create_extractor("dinov2", path, CPU, SMALL_DINOV2)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RcgError, match=f"no dinov2 weights at {tmp_path / 'missing.pth'}"):
        create_extractor("dinov2", tmp_path / "missing.pth", CPU, SMALL_DINOV2)
    with pytest.raises(RcgError, match="not a timm model name"):
        create_extractor("dinov2", dinov2_file, CPU, "no_such_vit")


def test_dinov2_official_layout_is_named_and_readme_conversion_loads(dinov2_file, tmp_path):
    """facebookresearch/dinov2's files hold a ``mask_token`` that timm's layout has not: the error says which layout
    it is, and the README's conversion (timm's checkpoint_filter_fn) gives a file that loads."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    official = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**torch.load(dinov2_file, weights_only=True), "mask_token": torch.zeros(1, 384)}, official)
    with pytest.raises(RcgError, match="facebookresearch/dinov2's own layout"):
        create_extractor("dinov2", official, CPU, SMALL_DINOV2)
    model = timm.create_model(SMALL_DINOV2, num_classes=0)
    converted = tmp_path / "dinov2_vits14_timm.pth"
    torch.save(checkpoint_filter_fn(torch.load(official, weights_only=True), model), converted)
    fe = create_extractor("dinov2", converted, CPU, SMALL_DINOV2)
    assert torch.equal(fe.model.pos_embed, torch.load(dinov2_file, weights_only=True)["pos_embed"])


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
