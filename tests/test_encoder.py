import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeline.models.encoder as enc
from official_files import mocov3_file
from pipeline.models.encoder import MoCoViT, normalize_for_encoder, represent, standardize
from pipeline.models.official.encoder import load_encoder, load_encoder_as
from pipeline.models.official.mocov3 import VIT_SIZES, import_mocov3_state_dict, infer_vit_config
from pipeline.core.artifacts import load_checkpoint
from pipeline.core.errors import RcgError

MANIFEST = Path("/work/shared/reference/manifests/mocov3_vitb_pth_tar.json")
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, proj_hidden_dim=64, proj_dim=16)


def tiny(seed: int = 0, **kw) -> MoCoViT:
    torch.manual_seed(seed)
    model = MoCoViT(**{**TINY, **kw})
    for m in model.head:  # non-trivial running stats, so eval-mode BN is actually exercised
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.skipif(not MANIFEST.is_file(), reason="reference manifest not available")
def test_official_vitb_keys_and_shapes():
    manifest = json.loads(MANIFEST.read_text())
    ckpt = {"state_dict": {k: torch.empty(s, device="meta") for k, s in manifest.items()}}
    imported = import_mocov3_state_dict(ckpt)
    with torch.device("meta"):
        model = MoCoViT(img_size=224, patch_size=16, **VIT_SIZES["base"])
    own = model.state_dict()
    assert len(own) == 166
    assert list(imported) == list(own)
    assert {k: list(v.shape) for k, v in imported.items()} == {k: list(v.shape) for k, v in own.items()}
    assert sum(p.numel() for p in model.parameters()) == 106_786_560


def test_vitl_misnamed_keys_are_renamed():
    with torch.device("meta"):
        model = MoCoViT(**VIT_SIZES["large"])
    own = model.state_dict()
    assert len(own) == 310 and sum(p.numel() for p in model.parameters()) == 325_338_112
    bad = {"blocks.13.norm1.": "blocks.13.norm13.", "blocks.13.mlp.fc1.": "blocks.13.mlp.fc13.",
           "blocks.14.norm2.": "blocks.14.norm14.", "blocks.14.mlp.fc2.": "blocks.14.mlp.fc14."}
    sd = {}
    for k, v in own.items():
        for good, wrong in bad.items():
            k = k.replace(good, wrong)
        sd[f"module.base_encoder.{k}"] = v
    assert sum("norm13" in k or "fc13" in k or "norm14" in k or "fc14" in k for k in sd) == 8
    sd["module.predictor.0.weight"] = torch.empty(4096, 256, device="meta")
    imported = import_mocov3_state_dict({"state_dict": sd})
    assert set(imported) == set(own)
    model.load_state_dict(imported, strict=True, assign=True)


def test_official_layout_round_trip(tmp_path):
    src = tiny(0)
    path = tmp_path / "vit.pth.tar"
    mocov3_file(path, src)
    dst = load_encoder_as(path, TINY)
    assert not dst.training  # every loader returns its model in eval mode
    src.eval()
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(represent(dst, x), represent(src, x))
    assert torch.equal(dst(x), src(x))
    # the config is read from the file; 32 wide is no standard size, so heads must be given
    with pytest.raises(RcgError, match="num_heads"):
        load_encoder(path)
    assert infer_vit_config(load_checkpoint(path)["state_dict"], num_heads=4) == {**TINY, "mlp_ratio": 4.0}
    auto = load_encoder(path, num_heads=4)
    assert not auto.training and torch.equal(represent(auto, x), represent(src, x))


def test_import_accepts_bare_stripped_and_unwrapped_moco():
    sd = tiny(0).state_dict()
    official = {**{f"module.base_encoder.{k}": v for k, v in sd.items()}, "module.predictor.0.weight": 0}
    for ckpt in (sd, {"state_dict": sd}, {f"base_encoder.{k}": v for k, v in sd.items()}, {"state_dict": official}):
        assert list(import_mocov3_state_dict(ckpt)) == list(sd)
    with pytest.raises(RcgError, match="must be a dict"):
        import_mocov3_state_dict([1, 2])


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
    path = tmp_path / "vit.pth.tar"
    mocov3_file(path, tiny(0))
    with pytest.raises(RcgError) as err:
        load_encoder_as(path, {**TINY, "depth": 3, "img_size": 32})
    msg = str(err.value)
    assert "2 missing keys" in msg and "blocks.2.norm1.weight" in msg
    assert "1 shape mismatches" in msg and "pos_embed [1, 17, 32] vs model [1, 65, 32]" in msg
    assert "unexpected" not in msg
    with pytest.raises(RcgError, match="not found"):
        load_encoder_as(tmp_path / "missing.pth", TINY)


def test_pos_embed_formula():
    model = MoCoViT(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=4, proj_hidden_dim=8, proj_dim=8)
    pe = model.pos_embed
    assert pe.shape == (1, 65, 32) and not pe.requires_grad
    assert torch.equal(pe[0, 0], torch.zeros(32))
    m, P = 13, 8
    r, c = m // 8, m % 8
    w = [10000 ** (-k / P) for k in range(P)]
    expect = ([math.sin(r * wk) for wk in w] + [math.cos(r * wk) for wk in w]
              + [math.sin(c * wk) for wk in w] + [math.cos(c * wk) for wk in w])
    torch.testing.assert_close(pe[0, 1 + m], torch.tensor(expect), atol=1e-6, rtol=0)
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_standardize_unbiased():
    r = torch.randn(5, 256) * 3 + 2
    s = standardize(r)
    torch.testing.assert_close(s.mean(-1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.std(-1), torch.ones(5))
    assert (s.std(-1, unbiased=False) - 1).abs().min() > 1e-3


def test_resize_only_when_sizes_differ(monkeypatch):
    calls = []
    real = F.interpolate
    monkeypatch.setattr(enc.F, "interpolate", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.rand(2, 3, 16, 16)
    same = normalize_for_encoder(x, 16)
    assert not calls
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(same, (x - mean[:, None, None]) / std[:, None, None])
    bigger = normalize_for_encoder(torch.rand(2, 3, 20, 20), 16)
    assert bigger.shape == (2, 3, 16, 16)
    assert calls == [dict(size=(16, 16), mode="bicubic", align_corners=False)]


def test_represent_forces_eval_and_matches_manual_pipeline():
    model = tiny(0).train()
    x = torch.rand(4, 3, 20, 20)
    r = represent(model, x)
    assert not model.training and r.shape == (4, 16) and r.dtype == torch.float32
    with torch.no_grad():
        manual = model.head(model.features(normalize_for_encoder(x, 16)))
    manual = (manual - manual.mean(1, keepdim=True)) / manual.std(1, keepdim=True)
    assert torch.equal(r, manual)
    assert torch.equal(represent(model, x), r)


def test_represent_returns_the_feature_and_the_projector_output():
    model = tiny(0)
    x = torch.rand(4, 3, 16, 16)
    rep, feature, projected = represent(model, x, return_features=True)
    assert torch.equal(rep, represent(model, x))  # the default output is unchanged
    assert feature.shape == (4, 32) and projected.shape == (4, 16)
    with torch.no_grad():
        trunk = model.forward_features(normalize_for_encoder(x, 16))[:, 0]  # cls token after the final LayerNorm
        assert torch.equal(feature, trunk) and torch.equal(projected, model.head(trunk))
    assert torch.equal(rep, standardize(projected)) and not torch.allclose(projected, rep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_represent_cuda_bf16_close_to_cpu_fp32():
    model = tiny(0)
    x = torch.rand(8, 3, 16, 16)
    ref = represent(model, x)
    gpu = represent(model.cuda(), x.cuda(), autocast_dtype=torch.bfloat16)
    assert gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), ref, atol=0.1, rtol=0.05)
