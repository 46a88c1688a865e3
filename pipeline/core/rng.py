"""Seeded random streams: every draw is a pure function of (seed, purpose, index, ...), so a resumed or
re-ranked run draws exactly what an uninterrupted one would have, with no global RNG and no saved RNG state.

The one helper behind every stage's randomness (batches, views, noise, augmentations, code restarts). A stream is
named: ``seeded_generator(device, params.seed, "pixel.step", it, rank)`` draws from the stream whose purpose
number is ``STREAMS["pixel.step"]`` (12), followed by the step and the rank. :data:`STREAMS` is the one list of
them; :data:`RUNS` says which streams one stage draws under one seed, and their numbers must differ there
(tests/test_loop.py). Streams of different stages may share a number: e.g. ``encoder.crops`` and
``tokenizer.crops`` are both 1, so the encoder's and the tokenizer's random crops of item k are the same draw.
"""

from __future__ import annotations

import numpy as np
import torch

# name -> purpose number: the entropy word after the seed (the step, epoch, rank, ... follow it). The numbers are
# those the stages have always drawn with, so the runs are bit-identical to before the names.
STREAMS: dict[str, int] = {
    "batches.permutation": 0,   # StepBatches: the epoch permutations (seed, 0, epoch)
    "loop.dropout": 16,         # TrainLoop: the global torch seed of each iteration (seed, 16, it, rank)
    "encoder.crops": 1,         # pretrain_encoder: the two random resized crops of item k
    "encoder.views": 2,         # pretrain_encoder: the views' augmentations at iteration it, per rank
    "tokenizer.crops": 1,       # train_tokenizer: the random crop of item k
    "tokenizer.restart": 2,     # train_tokenizer: the dead-code restarts at iteration it
    "judge.augment": 1,         # train_judge: the augmentation at iteration it, per rank
    "ssl_judge.crops": 1,       # train_ssl_judge (under ssl_judge.seed): the crops at iteration it, per rank
    "ssl_judge.views": 2,       # train_ssl_judge: the views' augmentations at iteration it, per rank
    "rdm.permutation": 1,       # RepBatches: the epoch permutations of the rep store
    "rdm.step": 2,              # RepBatches: the views, t and noise of step it, per rank
    "rdm.eval": 3,              # rdm_eval: the samples and draws of the FD evaluation
    "pixel.holdout": 10,        # pixel_data: the held-out images of the pixel evaluation
    "pixel.permutation": 11,    # PixelBatches: the epoch permutations of the token store
    "pixel.step": 12,           # PixelBatches: the views, masks and rep drops of micro-batch j of step it, per rank
    "pixel.kmeans": 13,         # pixel_data: the k-means initialisation of the cluster conditioning
    "pixel.eval": 14,           # train_pixel: the evaluation's decoding
    "pixel.codebook_init": 15,  # train_pixel: the word embeddings drawn around the tokenizer's code vectors
    "sample.chunk": 0,          # sample: store chunk c draws from (seed, 0 + c), the same in every setting
    "sample.figure": 1 << 40,   # sample: figure f draws from (seed, 2**40 + f), never a chunk's stream
}

# The streams one stage's run draws under one seed: their purposes must differ (numbers plus an offset, as the
# sample chunks and figures, must not reach each other's range).
RUNS: dict[str, list[str]] = {
    "pretrain_encoder": ["batches.permutation", "encoder.crops", "encoder.views", "loop.dropout"],
    "train_tokenizer": ["batches.permutation", "tokenizer.crops", "tokenizer.restart", "loop.dropout"],
    "train_judge": ["batches.permutation", "judge.augment", "loop.dropout"],
    "train_ssl_judge": ["batches.permutation", "ssl_judge.crops", "ssl_judge.views", "loop.dropout"],
    "train_rdm": ["rdm.permutation", "rdm.step", "rdm.eval", "loop.dropout"],
    "train_pixel": ["pixel.holdout", "pixel.permutation", "pixel.step", "pixel.kmeans", "pixel.eval",
                    "pixel.codebook_init", "loop.dropout"],
    "sample": ["sample.chunk", "sample.figure"],
}


def purpose(name: str, offset: int = 0) -> int:
    """The purpose number of stream ``name`` (plus ``offset``: a chunk or figure index)."""
    return STREAMS[name] + offset


def stream_seed(*entropy: int | str) -> int:
    """A 63-bit seed from a tuple (seed, purpose, ...): independent streams per tuple. A ``str`` entry is a
    stream name (:data:`STREAMS`) and stands for its purpose number."""
    words = [STREAMS[e] if isinstance(e, str) else e for e in entropy]
    seed = np.random.SeedSequence([e % 2**63 for e in words]).generate_state(1, np.uint64)[0]
    return int(seed) & (2**63 - 1)


def seeded_generator(device: torch.device | str, *entropy: int | str) -> torch.Generator:
    """A torch generator on ``device`` for the stream ``entropy``."""
    return torch.Generator(device).manual_seed(stream_seed(*entropy))


def seeded_numpy(*entropy: int | str) -> np.random.Generator:
    """A numpy generator for the stream ``entropy`` (data-loader side: permutations, crops)."""
    return np.random.default_rng(stream_seed(*entropy))
