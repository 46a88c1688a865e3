import argparse
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import RcgError
from pipeline.models.ema import EMA
from pipeline.models.rdm import RDM, RepWhitening, SimpleMLP, timestep_embedding
from pipeline.models.official.rdm import convert_official_rdm, ema_shadow_name, load_official_rdm
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.samplers.diffusion import ddim_sample, sample_reps

MANIFEST = Path("/work/shared/reference/manifests/rdm_vitb_l12_w1536.json")
TINY = dict(in_channels=8, time_embed_dim=6, model_channels=12, bottleneck_channels=10, out_channels=8,
            num_res_blocks=2, embed_dim=4)


def _numel(m):
    return sum(p.numel() for p in m.parameters())


def test_param_counts():
    with torch.device("meta"):
        assert _numel(SimpleMLP()) == 62_721_280
        assert _numel(SimpleMLP(use_context=True)) == 72_176_896
        assert _numel(RDM(class_cond=False)) == 62_721_280 + 512


@pytest.mark.skipif(not MANIFEST.exists(), reason="reference manifest not available")
def test_manifest_keys_map_to_simple_mlp():
    manifest = json.loads(MANIFEST.read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    sd["betas"] = GaussianDiffusion().betas  # the only value the importer reads
    config, net, ema, cond = convert_official_rdm(sd)
    assert config == dict(class_cond=False, n_classes=1, in_channels=256, time_embed_dim=256, model_channels=1536,
                          bottleneck_channels=1536, out_channels=256, num_res_blocks=12, embed_dim=512)
    with torch.device("meta"):
        ref = SimpleMLP()
    ref_sd = ref.state_dict()
    assert len(ref_sd) == 130
    assert list(net) == list(ref_sd)  # same names in the same registration order
    assert all(net[k].shape == ref_sd[k].shape for k in ref_sd)
    assert sorted(ema) == sorted(ref_sd) and all(ema[k].shape == ref_sd[k].shape for k in ref_sd)
    shadows = [k for k in manifest
               if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    assert sorted(shadows) == sorted(ema_shadow_name(n) for n, _ in ref.named_parameters())
    assert list(cond) == ["embedding.weight"] and tuple(cond["embedding.weight"].shape) == (1, 512)


def test_timestep_embedding_cos_first_raw_t():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_forward_shapes_init_and_layernorm_eps():
    torch.manual_seed(0)
    net = SimpleMLP(**{k: v for k, v in TINY.items() if k != "embed_dim"})
    assert net.res_blocks[0].in_layers[0].eps == 1e-5 and net.res_blocks[0].out_layers[0].eps == 1e-5
    assert net.out[0].eps == 1e-6
    assert all(torch.all(p == 0) for p in [*net.out[2].parameters(), *net.res_blocks[1].out_layers[3].parameters()])
    t = torch.tensor([5, 999])
    assert net(torch.randn(2, 8), t).shape == (2, 8)
    assert net(torch.randn(2, 8, 1, 1), t).shape == (2, 8, 1, 1)
    assert net(torch.randn(1, 8, 1, 1), t[:1]).shape == (1, 8, 1, 1)  # B=1 keeps its batch dim
    assert net(torch.randn(1, 8), t[:1]).shape == (1, 8)
    assert torch.all(net(torch.randn(2, 8), t) == 0)  # zero-initialised output layer


def test_rdm_conditioning():
    torch.manual_seed(0)
    x, t = torch.randn(3, 8), torch.tensor([1, 2, 3])
    uncond = RDM(class_cond=False, n_classes=5, **TINY)
    assert uncond.cond_stage_model.embedding.weight.shape == (1, 4)
    _randomize(uncond)
    assert torch.equal(uncond(x, t, None), uncond(x, t, torch.tensor([0, 3, 4])))
    cond = RDM(class_cond=True, n_classes=5, **TINY)
    _randomize(cond)
    assert not torch.allclose(cond(x, t, torch.tensor([0, 0, 0])), cond(x, t, torch.tensor([1, 1, 1])))
    # the embedding does reach the net: the same context through the net directly matches
    y = torch.tensor([2, 4, 1])
    assert torch.allclose(cond(x, t, y), cond.net(x, t, cond.cond_stage_model(y)))


def test_whitening_evens_out_the_spectrum_and_inverts():
    g = torch.Generator().manual_seed(0)
    eig = torch.tensor([50.0, 5.0, 0.5, 0.05, 0.005, 0.0])  # a collapsed spectrum with an exactly flat direction
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    x = (torch.randn(20000, 6, generator=g, dtype=torch.float64) * eig.double().sqrt()) @ basis.T + 3.0
    mean, cov = x.mean(0), torch.cov(x.T)
    w = RepWhitening(6)
    w.fit(mean, cov, power=0.0, eps=1e-3)  # the official raw reps: not even centred
    assert torch.equal(w.encode(x.float()), x.float())
    w.fit(mean, cov, power=0.25, eps=1e-3)
    z = w.encode(x.float()).double()
    var = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0)
    assert var.mean().item() == pytest.approx(1.0, rel=1e-3)  # unit mean variance
    lam = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    floored = lam.clamp_min(1e-3 * lam.mean())
    expected = lam / floored ** 0.5  # S^-p maps variance lam to lam x floored^(-2p): 10^4 apart -> 10^2
    assert torch.allclose(var / var[0], expected / expected[0], atol=1e-5)
    assert torch.allclose(w.decode(w.encode(x.float())), x.float(), atol=1e-4)
    assert z.mean(0).abs().max() < 1e-4


def test_sample_reps_maps_back_to_the_store_space():
    torch.manual_seed(0)
    model = RDM(**TINY)
    model.whitening.fit(torch.full((8,), 2.0), torch.diag(torch.logspace(1, -3, 8)), power=0.25, eps=1e-3)
    d = GaussianDiffusion()
    y = torch.zeros(5, dtype=torch.long)
    reps = sample_reps(model, d, y, steps=10, generator=torch.Generator().manual_seed(4))
    z = ddim_sample(d, model, (5, 8), y, steps=10, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(reps, z @ model.whitening.inverse_map.T + 2.0)
    assert {"whitening.mean", "whitening.forward_map", "whitening.inverse_map"} <= set(model.state_dict())
    g = torch.Generator().manual_seed(4)  # x_T and noise passed through: the generator's own draws, the same reps
    x_T = torch.randn(5, 8, generator=g)
    noise = torch.stack([torch.randn(5, 8, generator=g) for _ in range(10)])
    assert torch.equal(sample_reps(model, d, y, steps=10, x_T=x_T, noise=noise), reps)


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


def _official_sd(rdm, ema_offset=1.0):
    """An official-layout state dict for `rdm` (schedule, raw MLP, EMA shadows, frozen encoder, embedder)."""
    d = GaussianDiffusion()
    sd = {"betas": d.betas.clone(), "alphas_cumprod": d.alphas_cumprod.clone(),
          "posterior_variance": torch.zeros(1000)}
    sd.update({"model.diffusion_model." + k: v.clone() for k, v in rdm.net.state_dict().items()})
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(123, dtype=torch.int32)
    sd.update({ema_shadow_name(k): v.detach() + ema_offset for k, v in rdm.net.named_parameters()})
    sd["pretrained_encoder.cls_token"] = torch.zeros(1, 1, 3)
    sd["cond_stage_model.embedding.weight"] = rdm.cond_stage_model.embedding.weight.detach().clone()
    return sd


@pytest.mark.parametrize("class_cond", [False, True])
def test_official_checkpoint_round_trip(tmp_path, class_cond):
    torch.manual_seed(0)
    src = RDM(class_cond=class_cond, n_classes=5, **TINY)
    _randomize(src)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": _official_sd(src), "model_ema": None, "epoch": 199,
                "args": argparse.Namespace(blr=1e-6, batch_size=128)}, path)
    config, net_state, ema_state, cond_state = load_official_rdm(path)
    assert config == dict(class_cond=class_cond, n_classes=5 if class_cond else 1, **TINY)
    dst = RDM(**config)
    dst.net.load_state_dict(ema_state)
    dst.cond_stage_model.load_state_dict(cond_state)
    for k, v in src.net.state_dict().items():
        assert torch.equal(dst.net.state_dict()[k], v + 1.0)  # the EMA weights, not the raw ones
        assert torch.equal(net_state[k], v)
    assert torch.equal(dst.cond_stage_model.embedding.weight, src.cond_stage_model.embedding.weight)


def test_state_dict_wrapper_and_no_ema(tmp_path):
    src = RDM(class_cond=False, **TINY)
    sd = {k: v for k, v in _official_sd(src).items() if not k.startswith("model_ema.")}
    torch.save({"state_dict": sd}, tmp_path / "a.ckpt")
    _, net_state, ema_state, _ = load_official_rdm(tmp_path / "a.ckpt")
    assert ema_state is None and set(net_state) == set(src.net.state_dict())


class Payload:
    pass


def test_refuses_arbitrary_pickled_class(tmp_path):
    for i, obj in enumerate([Payload(), Fraction(1, 3)]):
        path = tmp_path / f"evil{i}.pth"
        torch.save({"model": {}, "args": obj}, path)
        with pytest.raises(RcgError):
            load_official_rdm(path)


def _expect_error(tmp_path, sd, *words):
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(RcgError) as err:
        load_official_rdm(path)
    for w in words:
        assert w in str(err.value)


def test_bad_checkpoints_named(tmp_path):
    src = RDM(class_cond=True, n_classes=5, **TINY)
    good = _official_sd(src)
    _expect_error(tmp_path, {"encoder.weight": torch.zeros(2)}, "not an official RDM checkpoint")

    sd = dict(good)
    del sd["model.diffusion_model.res_blocks.0.emb_layers.1.bias"]
    _expect_error(tmp_path, sd, "missing 1", "res_blocks.0.emb_layers.1.bias")

    sd = dict(good, **{"model.diffusion_model.extra.weight": torch.zeros(3)})
    _expect_error(tmp_path, sd, "unexpected 1", "extra.weight")

    sd = dict(good, **{"model.diffusion_model.res_blocks.1.in_layers.2.weight": torch.zeros(10, 13)})
    _expect_error(tmp_path, sd, "shape mismatch", "res_blocks.1.in_layers.2.weight")

    sd = dict(good)
    del sd[ema_shadow_name("out.2.bias")]
    _expect_error(tmp_path, sd, "model_ema", "missing 1", "out.2.bias")

    sd = dict(good, betas=torch.linspace(0.0015, 0.0195, 1000))  # linear in beta: not our schedule
    _expect_error(tmp_path, sd, "betas")

    sd = dict(good, **{"first_stage_model.weight": torch.zeros(1)})
    _expect_error(tmp_path, sd, "unexpected", "first_stage_model.weight")

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(RcgError):
        load_official_rdm(tmp_path / "list.pth")
    with pytest.raises(RcgError):
        load_official_rdm(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------
# EMA (LitEma semantics), used on the RDM's net


def test_ema_warmup_decay():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # n=1: decay 2/11, shadow = 0 + (9/11)(1 - 0)
    assert ema.num_updates == 1
    assert ema.shadow["weight"].item() == pytest.approx(9 / 11)
    ema.update(net)  # n=2: decay 3/12
    assert ema.shadow["weight"].item() == pytest.approx(9 / 11 + (1 - 3 / 12) * (1 - 9 / 11))
    ema.num_updates = 10 ** 6
    assert ema.decay() == 0.9999  # capped at max_decay
    assert EMA(net, max_decay=0.5, warmup=False).decay() == 0.5


def test_ema_swap_state_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 3))  # changes the BN buffers
    ema.update(model)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model):
        for k, v in model.state_dict().items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(v, after[k])  # buffers copied as they are
            else:
                assert torch.allclose(v, live[k] + 9 / 11)
    for k, v in model.state_dict().items():
        assert torch.equal(v, after[k])  # live weights restored

    state = ema.state_dict()
    assert int(state["num_updates"]) == 1 and set(state) == set(model.state_dict()) | {"num_updates"}
    other = EMA(model)
    other.load_state_dict(state)
    assert other.num_updates == 1 and torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])
    other.load_state_dict({k: v for k, v in state.items() if k != "num_updates"})  # bare weights
    assert other.num_updates == 0
    with pytest.raises(RcgError, match="missing 1"):
        other.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})


def test_ema_on_rdm_net_with_imported_weights(tmp_path):
    torch.manual_seed(0)
    src = RDM(class_cond=False, **TINY)
    _randomize(src)
    torch.save({"model": _official_sd(src, ema_offset=0.5)}, tmp_path / "c.pth")
    config, net_state, ema_state, _ = load_official_rdm(tmp_path / "c.pth")
    rdm = RDM(**config)
    rdm.net.load_state_dict(net_state)
    ema = EMA(rdm.net)
    ema.load_state_dict(ema_state)
    x, t = torch.randn(2, 8), torch.tensor([3, 7])
    raw = rdm(x, t)
    with ema.swapped_in(rdm.net):
        shifted = rdm(x, t)
    assert not torch.allclose(raw, shifted) and torch.equal(rdm(x, t), raw)
