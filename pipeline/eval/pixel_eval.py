"""Validation figures of a pixel generator: the masked-token loss and accuracy at one fixed mask ratio."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.models.mage import MAGE


@torch.no_grad()
def masked_token_eval(model: MAGE, tokens: torch.Tensor, c: torch.Tensor | None, mask_ratio: float,
                      generator: torch.Generator, batch_size: int = 128) -> dict[str, float]:
    """Label-smoothed cross-entropy (the training loss) and argmax accuracy over the masked positions of
    ``tokens`` [M, L], ceil(L ratio) of each masked at random (noise drawn for all M at once, so the figures do not
    depend on ``batch_size``), with the generation-time forward (eval mode, no token dropping). Also the same for
    the unconditional slot (``_null``): what the conditioning is worth."""
    model.eval()
    m, n = tokens.shape
    rank = torch.rand(m, n, generator=generator, device=tokens.device).argsort(1).argsort(1)
    masked = rank < math.ceil(n * mask_ratio)
    sums = torch.zeros(4, dtype=torch.float64, device=tokens.device)
    for i in range(0, m, batch_size):
        t, mk = tokens[i:i + batch_size], masked[i:i + batch_size]
        ids = t.masked_fill(mk, model.mask_id)
        cond = model.condition(None if c is None else c[i:i + batch_size], batch=len(t))
        for j, slot in enumerate((cond, model.null_condition(len(t)))):
            logits = model(ids, slot).float()
            ce = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none",
                                 label_smoothing=model.label_smoothing).view_as(t)
            sums[2 * j] += ce[mk].sum()
            sums[2 * j + 1] += (logits.argmax(-1) == t)[mk].sum()
    count = masked.sum().item()
    loss, acc, loss_null, acc_null = (sums / count).tolist()
    return {"val_loss": loss, "val_accuracy": acc, "val_loss_null": loss_null, "val_accuracy_null": acc_null}
