"""The DDIM sampler RCG generates representations with (docs/official.md §2.4), on the schedule of
:class:`pipeline.models.diffusion.GaussianDiffusion`; ``model_fn(x_t, t, y) -> x0_hat`` is all it needs."""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.core.errors import RcgError
from pipeline.models.diffusion import GaussianDiffusion, ModelFn, extract
from pipeline.models.rdm import RDM


def ddim_schedule(diffusion: GaussianDiffusion, steps: int,
                  eta: float) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Official DDIM timesteps tau = {0, c, 2c, ...} + 1 (c = T // steps) and per-step a_prev, sigma.

    a_prev of the first (smallest) step is abar[0], not 1, so the last sampling step still adds noise.
    """
    stride = diffusion.num_timesteps // steps if steps > 0 else 0
    if stride < 2:
        raise RcgError(f"DDIM steps must be in 1..{diffusion.num_timesteps // 2} for T={diffusion.num_timesteps} "
                       f"(the official +1 timestep offset needs a stride >= 2), got {steps}")
    tau = [i + 1 for i in range(0, diffusion.num_timesteps, stride)]
    abar = diffusion.alphas_cumprod.detach().cpu().double()
    a_t = abar[tau]
    a_prev = torch.cat([abar[:1], abar[tau[:-1]]])
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    return tau, a_prev.float(), sigma.float()


def ddim_step(diffusion: GaussianDiffusion, model_fn: ModelFn, x: torch.Tensor, t: int, a_prev: float, sigma: float,
              y: torch.Tensor | None, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (docs/official.md §2.4): x0_hat = net(x_t, t) (no clipping),
    eps_hat = (sqrt(1/abar_t) x_t - x0_hat) / sqrt(1/abar_t - 1),
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma temperature z."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0_hat = model_fn(x, tt, y).float()
    eps_hat = ((extract(diffusion.sqrt_recip_alphas_cumprod, tt, x) * x - x0_hat)
               / extract(diffusion.sqrt_recipm1_alphas_cumprod, tt, x))
    return a_prev ** 0.5 * x0_hat + (1.0 - a_prev - sigma ** 2) ** 0.5 * eps_hat + sigma * temperature * z


@torch.no_grad()
def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...], y: torch.Tensor | None,
                steps: int = 250, eta: float = 1.0, temperature: float = 1.0, generator: torch.Generator | None = None,
                progress: Callable[[int, int], None] | None = None, x_T: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM as RCG calls it (250 steps, eta 1): returns the final noisy x_prev, not the last x0_hat.

    Runs on the device of the schedule's buffers; ``generator`` (on that device) makes it reproducible.
    ``temperature`` scales only the injected noise. ``progress(i, n)`` is called after step i of n.
    ``x_T`` (``shape``) and ``noise`` ([steps, *shape], in sampling order: ``noise[0]`` is injected by the
    first step, at the largest t), when given, are used instead of draws from ``generator``; what is not
    given is drawn in the same order as without them (x_T, then one z per step).
    """
    tau, a_prevs, sigmas = ddim_schedule(diffusion, steps, eta)
    device = diffusion.betas.device
    n = len(tau)
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise RcgError(f"ddim_sample: noise has shape {tuple(noise.shape)}, expected {(n, *shape)}")
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    for i, idx in enumerate(reversed(range(n))):
        z = torch.randn(shape, generator=generator, device=device) if noise is None else noise[i].to(device)
        x = ddim_step(diffusion, model_fn, x, tau[idx], a_prevs[idx].item(), sigmas[idx].item(), y, z, temperature)
        if progress is not None:
            progress(i + 1, n)
    return x


@torch.no_grad()
def sample_reps(model: RDM, diffusion: GaussianDiffusion, labels: torch.Tensor, steps: int = 250, eta: float = 1.0,
                temperature: float = 1.0, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """[len(labels), D] representations in the store's space: DDIM in the RDM's space, mapped back. ``x_T`` and
    ``noise`` (in the RDM's space) go to :func:`ddim_sample`: given, they replace the draws."""
    z = ddim_sample(diffusion, model, (len(labels), model.whitening.mean.numel()), labels, steps=steps, eta=eta,
                              temperature=temperature, generator=generator, x_T=x_T, noise=noise)
    return model.whitening.decode(z)
