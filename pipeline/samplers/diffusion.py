"""The RDM's Gaussian diffusion: schedule, x0-prediction loss and the DDIM sampler RCG generates with.

Kept apart from the network (EDM-style): ``model_fn(x_t, t, y) -> x0_hat`` is all it needs.
Numbers follow the official LDM/RCG code (docs/official.md §2.2, §2.4).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import RcgError
from pipeline.models.rdm import RDM, ldm_betas

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped [B, 1, ...] to broadcast against x."""
    return a[t].view(len(t), *([1] * (x.dim() - 1))).to(x.dtype)


class GaussianDiffusion(nn.Module):
    """LDM's "linear" schedule (linear in sqrt(beta)) with x0-parameterisation.

    A module only so ``.to(device)`` moves the schedule; its buffers are non-persistent because they are
    a pure function of the constructor arguments and never belong in a checkpoint.
    """

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0195):
        super().__init__()
        self.num_timesteps = timesteps
        # float64 like LDM, stored as float32 like LDM's buffers
        betas = ldm_betas(timesteps, linear_start, linear_end)
        alphas_cumprod = np.cumprod(1.0 - betas)
        for name, value in [
            ("betas", betas),
            ("alphas_cumprod", alphas_cumprod),
            ("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod)),
            ("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod)),
            ("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod)),
            ("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1.0)),
        ]:
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of timesteps t."""
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)

    def training_loss(self, model_fn: ModelFn, x0: torch.Tensor, y: torch.Tensor | None,
                      generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the predicted and the true x0, t ~ U{0..T-1}.

        Official: plain MSE (no VLB, no per-t weighting). With ``min_snr_gamma`` each sample's error is weighted
        by min(SNR(t), gamma) (Min-SNR, Hang et al. 2023, the x0-prediction form): the large-t terms, whose
        irreducible error dominates the plain loss and its gradient noise, stop drowning out the small-t ones
        that decide how faithful the final samples are.

        ``t`` [B] and ``noise`` (x0's shape), when given, are used instead of draws from ``generator`` (t first,
        then the noise, so that given both an outside check needs no generator at all).
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (len(x0),), generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x0_hat = model_fn(self.q_sample(x0, t, noise), t, y)
        if min_snr_gamma is None:
            return F.mse_loss(x0_hat.float(), x0.float())
        error = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)
        return (error * self.snr(t).clamp(max=min_snr_gamma)).mean()

    def ddim_schedule(self, steps: int, eta: float) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Official DDIM timesteps tau = {0, c, 2c, ...} + 1 (c = T // steps) and per-step a_prev, sigma.

        a_prev of the first (smallest) step is abar[0], not 1, so the last sampling step still adds noise.
        """
        stride = self.num_timesteps // steps if steps > 0 else 0
        if stride < 2:
            raise RcgError(f"DDIM steps must be in 1..{self.num_timesteps // 2} for T={self.num_timesteps} "
                           f"(the official +1 timestep offset needs a stride >= 2), got {steps}")
        tau = [i + 1 for i in range(0, self.num_timesteps, stride)]
        abar = self.alphas_cumprod.detach().cpu().double()
        a_t = abar[tau]
        a_prev = torch.cat([abar[:1], abar[tau[:-1]]])
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        return tau, a_prev.float(), sigma.float()

    def ddim_step(self, model_fn: ModelFn, x: torch.Tensor, t: int, a_prev: float, sigma: float,
                  y: torch.Tensor | None, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """One DDIM step x_t -> x_prev (docs/official.md §2.4): x0_hat = net(x_t, t) (no clipping),
        eps_hat = (sqrt(1/abar_t) x_t - x0_hat) / sqrt(1/abar_t - 1),
        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma temperature z."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0_hat = model_fn(x, tt, y).float()
        eps_hat = ((_extract(self.sqrt_recip_alphas_cumprod, tt, x) * x - x0_hat)
                   / _extract(self.sqrt_recipm1_alphas_cumprod, tt, x))
        return a_prev ** 0.5 * x0_hat + (1.0 - a_prev - sigma ** 2) ** 0.5 * eps_hat + sigma * temperature * z

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape: tuple[int, ...], y: torch.Tensor | None, steps: int = 250,
                    eta: float = 1.0, temperature: float = 1.0, generator: torch.Generator | None = None,
                    progress: Callable[[int, int], None] | None = None, x_T: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM as RCG calls it (250 steps, eta 1): returns the final noisy x_prev, not the last x0_hat.

        Runs on the device of this module's buffers; ``generator`` (on that device) makes it reproducible.
        ``temperature`` scales only the injected noise. ``progress(i, n)`` is called after step i of n.
        ``x_T`` (``shape``) and ``noise`` ([steps, *shape], in sampling order: ``noise[0]`` is injected by the
        first step, at the largest t), when given, are used instead of draws from ``generator``; what is not
        given is drawn in the same order as without them (x_T, then one z per step).
        """
        tau, a_prevs, sigmas = self.ddim_schedule(steps, eta)
        device = self.betas.device
        n = len(tau)
        if noise is not None and tuple(noise.shape) != (n, *shape):
            raise RcgError(f"ddim_sample: noise has shape {tuple(noise.shape)}, expected {(n, *shape)}")
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
        for i, idx in enumerate(reversed(range(n))):
            z = torch.randn(shape, generator=generator, device=device) if noise is None else noise[i].to(device)
            x = self.ddim_step(model_fn, x, tau[idx], a_prevs[idx].item(), sigmas[idx].item(), y, z, temperature)
            if progress is not None:
                progress(i + 1, n)
        return x


@torch.no_grad()
def sample_reps(model: RDM, diffusion: GaussianDiffusion, labels: torch.Tensor, steps: int = 250, eta: float = 1.0,
                temperature: float = 1.0, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """[len(labels), D] representations in the store's space: DDIM in the RDM's space, mapped back. ``x_T`` and
    ``noise`` (in the RDM's space) go to :meth:`GaussianDiffusion.ddim_sample`: given, they replace the draws."""
    z = diffusion.ddim_sample(model, (len(labels), model.whitening.mean.numel()), labels, steps=steps, eta=eta,
                              temperature=temperature, generator=generator, x_T=x_T, noise=noise)
    return model.whitening.decode(z)
