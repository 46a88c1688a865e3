import json
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import RcgError
from pipeline.models.vqgan import VQGAN, code_usage, codebook_stats
from pipeline.models.official.vqgan import infer_vqgan_config, load_official_vqgan
from pipeline.models.vqgan_loss import VQGANLoss, hinge_d_loss

MANIFEST = Path("/work/shared/reference/manifests/vqgan_jax_strongaug.json")
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, n_embed=32)


def tiny(seed: int = 0, **overrides) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(**{**TINY, **overrides})


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.skipif(not MANIFEST.is_file(), reason="reference manifest not available")
def test_default_matches_official_manifest():
    with torch.device("meta"):
        model = VQGAN()
    sd = model.state_dict()
    manifest = json.loads(MANIFEST.read_text())
    assert list(sd) == list(manifest)
    assert {k: list(v.shape) for k, v in sd.items()} == manifest
    assert sum(p.numel() for p in model.parameters()) == 54_515_587
    assert model.downsample_factor == 16


def test_infer_config_default_and_tiny():
    with torch.device("meta"):
        default = VQGAN()
    assert infer_vqgan_config(default.state_dict()) == dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, embed_dim=256, n_embed=1024,
        in_channels=3, out_ch=3)
    assert infer_vqgan_config(tiny().state_dict()) == dict(TINY, in_channels=3, out_ch=3)
    with pytest.raises(RcgError, match="encoder.conv_in.weight"):
        infer_vqgan_config({"foo": torch.zeros(1)})


def test_tiny_shapes_and_dtypes():
    model = tiny().eval()
    x = images(2, 16)
    xrec, qloss, idx = model(x)
    assert xrec.shape == x.shape and qloss.dim() == 0
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.long
    tokens = model.encode_to_indices(x)
    assert torch.equal(tokens, idx) and int(tokens.max()) < 32
    out = model.decode_indices(tokens)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, xrec)
    with pytest.raises(RcgError, match="multiple of 2"):
        model.encode(images(1, 15))


def test_quantizer_picks_nearest_code_in_bhw_order():
    q = tiny().quantize
    codes = torch.randn(32, 16) * 3
    q.embedding.weight.data.copy_(codes)
    want = torch.randint(0, 32, (2, 3, 4))
    z = (codes[want].permute(0, 3, 1, 2) + 0.01 * torch.randn(2, 16, 3, 4)).requires_grad_()
    z_q, loss, idx = q(z)
    assert torch.equal(idx, want)
    brute = ((z.permute(0, 2, 3, 1)[..., None, :] - codes) ** 2).sum(-1).argmin(-1)
    assert torch.equal(idx, brute)
    torch.testing.assert_close(z_q, codes[want].permute(0, 3, 1, 2))
    diff = (z - z_q).detach()
    torch.testing.assert_close(loss, (1 + q.beta) * diff.square().mean())
    loss.backward()  # beta weighs the commitment term (encoder side), 1 the codebook term
    torch.testing.assert_close(z.grad, q.beta * 2 * diff / diff.numel())
    code_grad = torch.zeros_like(codes).index_add_(0, want.flatten(), -2 * diff.permute(0, 2, 3, 1).reshape(-1, 16))
    torch.testing.assert_close(q.embedding.weight.grad, code_grad / diff.numel())


def test_straight_through_gradient_reaches_encoder():
    model = tiny()
    xrec, _, _ = model(images())
    xrec.square().mean().backward()  # reconstruction only: encoder grads can only come through the estimator
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    grad = model.quantize.embedding.weight.grad
    assert grad is None or grad.abs().sum() == 0  # the codebook learns only from the codebook loss


def test_restart_dead_codes_changes_exactly_dead_codes():
    q = tiny().quantize
    before = q.embedding.weight.detach().clone()
    counts = torch.ones(32, dtype=torch.long) * 5
    dead = torch.tensor([1, 7, 30])
    counts[dead] = 0
    counts[3] = 1  # used exactly min_count times: alive
    z_flat = torch.randn(50, 16)
    n = q.restart_dead_codes(z_flat, counts, min_count=1, generator=torch.Generator().manual_seed(0))
    after = q.embedding.weight.detach()
    assert n == 3
    changed = (after != before).any(1).nonzero().flatten()
    assert torch.equal(changed, dead)
    nearest = torch.cdist(after[dead], z_flat).min(1).values
    assert (nearest < 0.1).all()  # restarted onto encoder outputs, up to a little noise
    assert q.restart_dead_codes(z_flat, torch.ones(32), min_count=1) == 0


def test_code_usage_and_codebook_stats():
    counts = code_usage(torch.tensor([[0, 2], [2, 2]]), 4)
    assert counts.tolist() == [1, 0, 3, 0]
    uniform = codebook_stats(torch.full((8,), 10))
    assert uniform["usage"] == 1.0 and uniform["perplexity"] == pytest.approx(8.0)
    single = codebook_stats(torch.tensor([0, 0, 40, 0, 0, 0, 0, 0]))
    assert single["usage"] == pytest.approx(1 / 8) and single["perplexity"] == pytest.approx(1.0)


@pytest.mark.parametrize("wrap", [False, True])
def test_official_layout_round_trip(tmp_path, wrap):
    src = tiny(seed=1)
    sd = src.state_dict()
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": sd} if wrap else sd, path)
    model = load_official_vqgan(path, tiny(seed=2))
    inferred = load_official_vqgan(path)  # architecture read from the file
    for loaded in (model, inferred):
        assert not any(m.training for m in loaded.modules())  # eval mode, like every loader
        for k, v in sd.items():
            assert torch.equal(loaded.state_dict()[k], v), k
    x = images(1)
    torch.testing.assert_close(inferred.eval()(x)[0], src.eval()(x)[0])


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
    path = tmp_path / "vqgan.ckpt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(RcgError, match=r"missing keys \(encoder\.down\.0\.block\.1\."):
        load_official_vqgan(path, tiny(num_res_blocks=2))
    with pytest.raises(RcgError, match=r"1 shape mismatches \(quantize\.embedding\.weight file \[32, 16\] vs model \[64, 16\]"):
        load_official_vqgan(path, tiny(n_embed=64))
    with pytest.raises(RcgError, match="unexpected keys"):
        load_official_vqgan(path, tiny(ch_mult=(1,)))
    with pytest.raises(RcgError, match="not found"):
        load_official_vqgan(tmp_path / "nope.ckpt")


def test_gan_terms_off_before_disc_start_on_after():
    model = tiny()
    loss_fn = VQGANLoss(disc_start=5, disc_ndf=16, disc_num_layers=2)
    x = images(2)
    xrec, qloss, _ = model(x)
    loss, logs = loss_fn.generator_loss(x, xrec, qloss, step=4, last_layer=model.get_last_layer())
    assert logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0
    assert loss.item() == pytest.approx(logs["rec_loss"] + logs["q_loss"], rel=1e-5)
    d_loss, _ = loss_fn.discriminator_loss(x, xrec, step=4)
    assert d_loss.item() == 0.0

    loss, logs = loss_fn.generator_loss(x, xrec, qloss, step=5, last_layer=model.get_last_layer())
    assert logs["g_loss"] != 0.0 and 0.0 < logs["d_weight"] <= 0.8 * 1e4
    assert loss.item() == pytest.approx(logs["rec_loss"] + logs["q_loss"] + logs["d_weight"] * logs["g_loss"], rel=1e-4)
    d_loss, d_logs = loss_fn.discriminator_loss(x, xrec, step=5)
    assert d_loss.item() > 0 and d_loss.requires_grad
    d_loss.backward()
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0


def test_adam_steps_lower_reconstruction_loss():
    model = tiny()
    loss_fn = VQGANLoss(disc_start=10**9)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = images(4, 16, seed=3)
    recs = []
    for step in range(15):
        xrec, qloss, _ = model(x)
        loss, logs = loss_fn.generator_loss(x, xrec, qloss, step, model.get_last_layer())
        opt.zero_grad()
        loss.backward()
        opt.step()
        recs.append(logs["rec_loss"])
    assert recs[-1] < 0.7 * recs[0]
