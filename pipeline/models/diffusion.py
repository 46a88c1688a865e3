"""The RDM's Gaussian diffusion process: LDM's noise schedule and the forward (noising) process, x0-parameterised
(docs/official.md §2.2). As in EDM, schedule, loss and sampler stand apart: the x0 loss is
:mod:`pipeline.losses.diffusion`, the DDIM sampler :mod:`pipeline.samplers.diffusion`; ``model_fn(x_t, t, y) ->
x0_hat`` is all either needs of the network.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# The noise schedule every official RDM is trained for (rdm.diffusion's defaults).
OFFICIAL_SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}


def ldm_betas(timesteps: int, linear_start: float, linear_end: float) -> np.ndarray:
    """LDM's "linear" schedule: betas linear in sqrt(beta), in float64 (what the diffusion and the official
    checkpoint check both compute)."""
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2


def extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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
        return (extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of timesteps t."""
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)
