"""Seeded random streams: every draw is a pure function of (seed, purpose, index, ...), so a resumed or
re-ranked run draws exactly what an uninterrupted one would have, with no global RNG and no saved RNG state."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(device: torch.device | str, *entropy: int) -> torch.Generator:
    """A generator on ``device`` seeded from a tuple (seed, purpose, ...): independent streams per tuple."""
    seed = np.random.SeedSequence([e % 2**63 for e in entropy]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed) & (2**63 - 1))
