"""The RDM's training loss: MSE on the predicted x0 (docs/official.md §2.2), optionally Min-SNR weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.diffusion import GaussianDiffusion, ModelFn


def x0_loss(diffusion: GaussianDiffusion, model_fn: ModelFn, x0: torch.Tensor, y: torch.Tensor | None,
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
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x0_hat = model_fn(diffusion.q_sample(x0, t, noise), t, y)
    if min_snr_gamma is None:
        return F.mse_loss(x0_hat.float(), x0.float())
    error = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)
    return (error * diffusion.snr(t).clamp(max=min_snr_gamma)).mean()
