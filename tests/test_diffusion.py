import math

import pytest
import torch

from pipeline.gen.diffusion import GaussianDiffusion
from pipeline.core.errors import RcgError


def test_schedule_values():
    d = GaussianDiffusion()
    assert d.betas.dtype == torch.float32 and d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert d.betas[-1].item() == pytest.approx(0.0195, rel=1e-6)
    # linear in sqrt(beta), not in beta
    s0, s1 = 0.0015 ** 0.5, 0.0195 ** 0.5
    assert d.betas[500].item() == pytest.approx((s0 + (s1 - s0) * 500 / 999) ** 2, rel=1e-6)
    assert d.betas[500].item() != pytest.approx(0.0015 + (0.0195 - 0.0015) * 500 / 999, rel=1e-2)
    abar = d.alphas_cumprod
    assert abar[0].item() == pytest.approx(0.9985, rel=1e-6)
    assert abar[499].item() == pytest.approx(0.11584, abs=1e-5)
    assert abar[999].item() == pytest.approx(1.4230e-4, rel=1e-4)
    assert not d.state_dict()  # derived, never saved


def test_ddim_sigmas_and_timesteps():
    d = GaussianDiffusion()
    tau, a_prev, sigma = d.ddim_schedule(250, eta=1.0)
    assert tau[0] == 1 and tau[1] == 5 and tau[-1] == 997 and len(tau) == 250
    assert a_prev[0].item() == pytest.approx(0.9985, rel=1e-6)  # abar[0], not 1
    assert round(sigma[-1].item(), 4) == 0.2745  # first sampling step, t=997
    assert round(sigma[0].item(), 4) == 0.0274  # last sampling step, t=1
    assert torch.all(d.ddim_schedule(250, eta=0.0)[2] == 0)
    with pytest.raises(RcgError):
        d.ddim_schedule(1000, eta=1.0)  # stride 1 would index abar[1000]


def test_q_sample_statistics():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 4), 2.0)
    t = torch.full((20000,), 499, dtype=torch.long)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = 0.11584
    assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(abar), abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - abar), abs=0.01)
    # 4-D input broadcasts per sample
    x4 = torch.ones(3, 2, 1, 1)
    t3 = torch.tensor([0, 500, 999])
    out = d.q_sample(x4, t3, torch.zeros_like(x4))
    assert torch.allclose(out[:, 0, 0, 0], d.sqrt_alphas_cumprod[t3])


def test_training_loss_is_x0_mse():
    d = GaussianDiffusion()
    x0 = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    seen = {}

    def stub(x_t, t, y):
        seen.update(x_t=x_t, t=t, y=y)
        return torch.zeros_like(x_t) + 0.5

    loss = d.training_loss(stub, x0, y=torch.arange(8), generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(((0.5 - x0) ** 2).mean().item(), rel=1e-6)
    assert torch.equal(seen["y"], torch.arange(8))
    # replay the generator: t ~ U{0..T-1}, then eps; x_t must be the forward process at that t
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["x_t"], d.q_sample(x0, t, noise))


def test_min_snr_weighting():
    """Each sample's x0 error is weighted by min(SNR(t), gamma); gamma None is the official plain MSE."""
    d = GaussianDiffusion()
    x0 = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    stub = lambda x_t, t, y: 0.5 * x_t  # noqa: E731
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    error = ((0.5 * x_t - x0) ** 2).mean(1)
    abar = d.alphas_cumprod[t]
    snr = abar / (1 - abar)
    assert torch.allclose(d.snr(t), snr)
    assert snr.max() > 5 > snr.min()  # both sides of the clamp are exercised
    loss = d.training_loss(stub, x0, None, generator=torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    assert loss.item() == pytest.approx((error * snr.clamp(max=5.0)).mean().item(), rel=1e-5)
    plain = d.training_loss(stub, x0, None, generator=torch.Generator().manual_seed(3))
    assert plain.item() == pytest.approx(error.mean().item(), rel=1e-5)


def test_ddim_oracle_lands_on_point():
    d = GaussianDiffusion()
    p = torch.tensor([1.5, -2.0, 0.3])
    calls = []

    def oracle(x, t, y):
        calls.append(int(t[0]))
        return p.expand_as(x)

    x = d.ddim_sample(oracle, (4000, 3), None, steps=250, generator=torch.Generator().manual_seed(0))
    assert calls[0] == 997 and calls[-1] == 1 and len(calls) == 250
    assert torch.allclose(x.mean(0), p * 0.9985 ** 0.5, atol=0.005)
    # the returned sample is the noisy x_prev at abar[0] (std sqrt(1 - 0.9985)), not x0_hat
    assert torch.allclose(x.std(0), torch.full((3,), (1 - 0.9985) ** 0.5), rtol=0.05)


def test_ddim_reproducible_and_temperature():
    d = GaussianDiffusion()
    f = lambda x, t, y: 0.5 * x  # noqa: E731
    a = d.ddim_sample(f, (5, 4), None, steps=10, generator=torch.Generator().manual_seed(7))
    b = d.ddim_sample(f, (5, 4), None, steps=10, generator=torch.Generator().manual_seed(7))
    c = d.ddim_sample(f, (5, 4), None, steps=10, temperature=0.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    ticks = []
    d.ddim_sample(f, (1, 4), None, steps=10, progress=lambda i, n: ticks.append((i, n)))
    assert ticks[0] == (1, 10) and ticks[-1] == (10, 10)
