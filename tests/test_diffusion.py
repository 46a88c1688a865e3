import math

import pytest
import torch

from pipeline.models.diffusion import GaussianDiffusion
from pipeline.losses.diffusion import x0_loss
from pipeline.samplers.diffusion import ddim_sample, ddim_schedule, ddim_step
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
    tau, a_prev, sigma = ddim_schedule(d, 250, eta=1.0)
    assert tau[0] == 1 and tau[1] == 5 and tau[-1] == 997 and len(tau) == 250
    assert a_prev[0].item() == pytest.approx(0.9985, rel=1e-6)  # abar[0], not 1
    assert round(sigma[-1].item(), 4) == 0.2745  # first sampling step, t=997
    assert round(sigma[0].item(), 4) == 0.0274  # last sampling step, t=1
    assert torch.all(ddim_schedule(d, 250, eta=0.0)[2] == 0)
    with pytest.raises(RcgError):
        ddim_schedule(d, 1000, eta=1.0)  # stride 1 would index abar[1000]


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

    loss = x0_loss(d, stub, x0, y=torch.arange(8), generator=torch.Generator().manual_seed(3))
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
    loss = x0_loss(d, stub, x0, None, generator=torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    assert loss.item() == pytest.approx((error * snr.clamp(max=5.0)).mean().item(), rel=1e-5)
    plain = x0_loss(d, stub, x0, None, generator=torch.Generator().manual_seed(3))
    assert plain.item() == pytest.approx(error.mean().item(), rel=1e-5)


def test_ddim_oracle_lands_on_point():
    d = GaussianDiffusion()
    p = torch.tensor([1.5, -2.0, 0.3])
    calls = []

    def oracle(x, t, y):
        calls.append(int(t[0]))
        return p.expand_as(x)

    x = ddim_sample(d, oracle, (4000, 3), None, steps=250, generator=torch.Generator().manual_seed(0))
    assert calls[0] == 997 and calls[-1] == 1 and len(calls) == 250
    assert torch.allclose(x.mean(0), p * 0.9985 ** 0.5, atol=0.005)
    # the returned sample is the noisy x_prev at abar[0] (std sqrt(1 - 0.9985)), not x0_hat
    assert torch.allclose(x.std(0), torch.full((3,), (1 - 0.9985) ** 0.5), rtol=0.05)


def test_ddim_reproducible_and_temperature():
    d = GaussianDiffusion()
    f = lambda x, t, y: 0.5 * x  # noqa: E731
    a = ddim_sample(d, f, (5, 4), None, steps=10, generator=torch.Generator().manual_seed(7))
    b = ddim_sample(d, f, (5, 4), None, steps=10, generator=torch.Generator().manual_seed(7))
    c = ddim_sample(d, f, (5, 4), None, steps=10, temperature=0.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    ticks = []
    ddim_sample(d, f, (1, 4), None, steps=10, progress=lambda i, n: ticks.append((i, n)))
    assert ticks[0] == (1, 10) and ticks[-1] == (10, 10)


# ------------------------------------------------------------------------------ given draws (testable samplers)
def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    return lambda x, t, y: net(x) + t[:, None].float() / 1000


def test_given_draws_equal_the_generator_bit_for_bit():
    """x_T, per-step noise and t passed in give exactly what the generator alone gives (same draw order)."""
    d, f = GaussianDiffusion(), _net()
    drawn = ddim_sample(d, f, (5, 4), None, steps=20, temperature=0.7, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(5, 4, generator=g)
    noise = torch.stack([torch.randn(5, 4, generator=g) for _ in range(20)])
    assert torch.equal(ddim_sample(d, f, (5, 4), None, steps=20, temperature=0.7, x_T=x_T, noise=noise), drawn)
    assert not torch.equal(ddim_sample(d, f, (5, 4), None, steps=20, temperature=0.7, x_T=x_T, noise=noise.flip(0)),
                           drawn)

    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    loss = x0_loss(d, f, x0, None, generator=torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(x0_loss(d, f, x0, None, min_snr_gamma=5.0, t=t, noise=eps), loss)
    assert not torch.equal(x0_loss(d, f, x0, None, min_snr_gamma=5.0, t=t.flip(0), noise=eps), loss)


def test_training_loss_with_given_t_and_noise_is_the_reference_x0_mse():
    d = GaussianDiffusion()
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0, 499, 999])
    seen = {}

    def stub(x_t, tt, y):
        seen.update(x_t=x_t, t=tt)
        return torch.zeros_like(x_t)

    loss = x0_loss(d, stub, x0, None, t=t, noise=eps)
    abar = torch.tensor([0.9985, 0.11584, 1.4230e-4])
    torch.testing.assert_close(seen["x_t"], abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps,
                               rtol=2e-4, atol=1e-4)
    assert torch.equal(seen["t"], t) and loss.item() == pytest.approx(x0.pow(2).mean().item(), rel=1e-6)


def _abar64() -> torch.Tensor:
    """The schedule written out again from section 2.2, in float64."""
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_one_ddim_step_is_the_reference_formula():
    """docs/official.md §2.4, first step of the 250-step eta=1 sampler (t=997, a_prev=abar[993])."""
    d, f = GaussianDiffusion(), _net()
    tau, a_prev, sigma = ddim_schedule(d, 250, eta=1.0)
    abar = _abar64()
    a_t, a_p = abar[997], abar[993]
    s = ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
    assert tau[-1] == 997 and a_prev[-1].item() == pytest.approx(a_p.item(), rel=1e-6)
    assert sigma[-1].item() == pytest.approx(s.item(), rel=1e-5) and round(s.item(), 4) == 0.2745
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    out = ddim_step(d, f, x, 997, a_prev[-1].item(), sigma[-1].item(), None, z, temperature=0.5)

    x64 = x.double()
    x0_hat = f(x, torch.full((6,), 997), None).double()
    eps_hat = ((1 / a_t).sqrt() * x64 - x0_hat) / (1 / a_t - 1).sqrt()
    x0_prime = (x64 - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
    torch.testing.assert_close(x0_prime, x0_hat, rtol=1e-4, atol=1e-4)  # x0' equals x0_hat again
    expected = a_p.sqrt() * x0_prime + (1 - a_p - s ** 2).sqrt() * eps_hat + s * 0.5 * z.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_ddim_sample_is_the_hand_written_loop():
    """Two steps (stride 500: tau = {1, 501}), walked by hand with the given x_T and noise."""
    d, f = GaussianDiffusion(), _net()
    g = torch.Generator().manual_seed(1)
    x_T, noise = torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = ddim_sample(d, f, (3, 4), None, steps=2, eta=1.0, x_T=x_T, noise=noise)
    abar = _abar64()
    x = x_T.double()
    for i, (t, prev) in enumerate([(501, 1), (1, 0)]):
        a_t, a_p = abar[t], abar[prev]
        s = ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
        x0_hat = f(x.float(), torch.full((3,), t), None).double()
        eps_hat = ((1 / a_t).sqrt() * x - x0_hat) / (1 / a_t - 1).sqrt()
        x = a_p.sqrt() * x0_hat + (1 - a_p - s ** 2).sqrt() * eps_hat + s * noise[i].double()
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)
    with pytest.raises(RcgError, match="noise has shape"):
        ddim_sample(d, f, (3, 4), None, steps=2, x_T=x_T, noise=noise[:1])
