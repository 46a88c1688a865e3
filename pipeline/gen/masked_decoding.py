"""MAGE's iterative masked-token decoding (docs/official.md §3.3), beside the model rather than inside it.

From a fully masked grid (or a partly given one: infill), each of T steps predicts every unknown token, samples
it from the softmax, keeps the most confident and re-masks the rest, following the cosine schedule. All noise
comes from one seeded torch generator (the official draws the Gumbel noise from numpy's global RNG).
"""

from __future__ import annotations

import math

import torch

from pipeline.core.errors import RcgError
from pipeline.models.mage import MAGE


def guidance_scale(scale: float, step: int, num_iter: int) -> float:
    """The official linear guidance ramp s_k = s (k+1) / T."""
    return scale * (step + 1) / num_iter


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: cond + s (cond - uncond)."""
    return cond + scale * (cond - uncond)


def gumbel(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) from ``generator``, u kept off 0 and 1."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def decode_tokens(model: MAGE, cond: torch.Tensor, generator: torch.Generator, num_iter: int = 20,
                  choice_temperature: float = 6.0, guidance: float = 0.0,
                  tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B, L] decoded for slot vectors ``cond`` [B, rep_dim] (from ``model.condition``).

    ``guidance`` s > 0 runs the conditional and the unconditional (``fake_latent``) branch in one batch of 2B
    and mixes their logits with s_k = s (k+1)/T. ``tokens`` [B, L] turns on infill: its ids other than
    ``model.mask_id`` stay fixed and only the masked ones are decoded, on the same schedule scaled to their
    count. The result is a pure function of the inputs and the generator's state.
    """
    b, n, device = len(cond), model.seq_len, cond.device
    if num_iter < 1:
        raise RcgError(f"masked decoding needs at least 1 iteration, got {num_iter}")
    if guidance < 0 or choice_temperature < 0:
        raise RcgError(f"guidance ({guidance}) and choice temperature ({choice_temperature}) must be >= 0")
    if tokens is None:
        ids = torch.full((b, n), model.mask_id, dtype=torch.long, device=device)
    else:
        ids = tokens.long().clone()
    if ids.shape != (b, n):
        raise RcgError(f"infill tokens have shape {list(ids.shape)}, expected {[b, n]}")
    slots = torch.cat([cond, model.null_condition(b)]) if guidance > 0 else cond
    to_decode = (ids == model.mask_id).sum(1, keepdim=True).double()  # N of the schedule: L unless infilling
    sampled = ids
    for step in range(num_iter):
        ids, sampled = decode_step(model, ids, slots, step, num_iter, to_decode, generator, choice_temperature,
                                   guidance)
    return sampled


@torch.no_grad()
def decode_step(model: MAGE, ids: torch.Tensor, slots: torch.Tensor, step: int, num_iter: int,
                to_decode: torch.Tensor, generator: torch.Generator, choice_temperature: float = 6.0,
                guidance: float = 0.0, return_logits: bool = False) -> tuple[torch.Tensor, ...]:
    """Step ``step`` of ``num_iter`` of :func:`decode_tokens`: ``ids`` [B, L] (``model.mask_id`` where unknown),
    ``slots`` the slot vectors ([2B, rep_dim] with the unconditional half when ``guidance`` > 0), ``to_decode``
    [B, 1] the schedule's N per row (float64). -> (the ids for the next step, this step's sampled ids[, with
    ``return_logits`` the logits [B, L, codebook] they were sampled from, guidance applied]): an outside check
    can compare a step's logits with the official code's."""
    device = slots.device
    logits = model(torch.cat([ids, ids]) if guidance > 0 else ids, slots).float()
    if guidance > 0:
        logits = guided_logits(*logits.chunk(2), guidance_scale(guidance, step, num_iter))
    logp = torch.log_softmax(logits, -1)
    unknown = ids == model.mask_id
    draw = (logp + gumbel(logp.shape, generator, device)).argmax(-1)  # Gumbel-max: a softmax sample
    sampled = torch.where(unknown, draw, ids)
    ratio = (step + 1) / num_iter
    n_mask = torch.floor(to_decode * math.cos(math.pi / 2 * ratio))
    n_mask = torch.maximum(torch.ones_like(n_mask), torch.minimum(unknown.sum(1, keepdim=True) - 1, n_mask))
    confidence = logp.gather(-1, draw[..., None])[..., 0]
    confidence = confidence + choice_temperature * (1 - ratio) * gumbel(confidence.shape, generator, device)
    confidence = confidence.masked_fill(~unknown, math.inf)
    cutoff = confidence.sort(-1).values.gather(-1, n_mask.long() - 1)
    remask = (confidence <= cutoff) & unknown.any(1, keepdim=True)  # ties can re-mask more (official)
    ids = torch.where(remask, model.mask_id, sampled)
    return (ids, sampled, logits) if return_logits else (ids, sampled)
