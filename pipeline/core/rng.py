"""Seeded random streams: every draw is a pure function of (seed, purpose, index, ...), so a resumed or
re-ranked run draws exactly what an uninterrupted one would have, with no global RNG and no saved RNG state.

The one helper behind every stage's randomness (batches, views, noise, augmentations, code restarts): a stream is
named by a tuple of ints, usually ``(params.seed, PURPOSE, step or index, rank ...)``.
"""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(*entropy: int) -> int:
    """A 63-bit seed from a tuple (seed, purpose, ...): independent streams per tuple."""
    seed = np.random.SeedSequence([e % 2**63 for e in entropy]).generate_state(1, np.uint64)[0]
    return int(seed) & (2**63 - 1)


def seeded_generator(device: torch.device | str, *entropy: int) -> torch.Generator:
    """A torch generator on ``device`` for the stream ``entropy``."""
    return torch.Generator(device).manual_seed(stream_seed(*entropy))


def seeded_numpy(*entropy: int) -> np.random.Generator:
    """A numpy generator for the stream ``entropy`` (data-loader side: permutations, crops)."""
    return np.random.default_rng(stream_seed(*entropy))
