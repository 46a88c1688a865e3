"""Pixel-generator throughput: train_pixel on cached stores vs the bare model step, vs the official way; decoding.

    python -m bench.pixel [--steps N] [--batch B] [--threads T] [--images N] [--decode-batch B] [--mage-b B]

(1) stage / bare: samples/s of ``rcg train-pixel rep`` (the shared loop over aligned in-memory stores: batch
    gather, random views, masks, AdamW, clipping, loss checks, curves; run as a user runs it, in a fresh process)
    over the bare forward + backward + AdamW of the same MAGE on one fixed batch of random tokens and reps, in
    this process, same threads. Target >= 0.9. The stores are synthetic with the default run's shapes
    (N x 2 views x 8x8 tokens of a 256-code book, 256-d reps): the stage cannot tell them from real ones.
(2) official / ours: the official recipe also runs the VQGAN encoder and the MoCo v3 encoder on every image at
    every step; here that is the default run's tokenizer and encoder forward on ready-made 32x32 views plus the same
    bare step (JPEG decoding and cropping, which the official loader also pays, are left out: a lower bound).
(3) decoding: images/s of ``decode_tokens`` (T = 20, choice temperature 6) without and with guidance (2B batch).
(4) ``--mage-b B``: (2) and (3) at the paper's size for a few CPU steps of batch B: MAGE-B (official vocabulary,
    16x16 tokens) vs MAGE-B + the official VQGAN on 256x256 + MoCo v3 ViT-B/16 (at 224) per image, random weights.
(5) the grid convolution's cost: the bare step with ``pixel.model.grid_conv`` as in the defaults over the same step
    without it (0), in fp32 and under bf16 autocast, timed alternately (three rounds each) in this process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import run_stage  # noqa: E402
from pipeline.core.config import Params, validate  # noqa: E402
from pipeline.data.stores import StoreWriter  # noqa: E402
from pipeline.gen.masked_decoding import decode_tokens  # noqa: E402
from pipeline.models.encoder import MoCoViT, build_encoder, represent  # noqa: E402
from pipeline.models.mage import MAGE, MAGE_SIZES, mage_kwargs, masked_token_loss  # noqa: E402
from pipeline.models.official.mocov3 import VIT_SIZES  # noqa: E402
from pipeline.models.vqgan import VQGAN, model_kwargs  # noqa: E402
from pipeline.train.loop import param_groups  # noqa: E402


def write_stores(root: Path, n: int, views: int, grid: int, codebook: int, dim: int) -> None:
    """Aligned random token and rep stores with the identity layout tokenize / encode write."""
    rng = np.random.default_rng(0)
    shared = {"views": {"count": views}, "index": {"sha256": "0" * 64, "split": "train", "rows": n}}
    labels = np.arange(n) % 10
    stores = {"tokens": ({**shared, "tokenizer": {"sha256": "0" * 64, "config": {}}, "grid": [grid, grid],
                          "codebook_size": codebook},
                         rng.integers(0, codebook, (n, views, grid, grid)).astype(np.uint16), "uint16"),
              "reps": ({**shared, "encoder": {}, "dim": dim}, rng.standard_normal((n, views, dim), np.float32),
                       "float32")}
    for name, (identity, values, dtype) in stores.items():
        writer = StoreWriter(root / "data" / f"{name}.zarr", name, values.shape, dtype, 1024, identity, labels)
        for c in range(writer.num_chunks):
            writer.write(c, values[writer.rows(c)])
        writer.finalize()


def bare_rate(model: MAGE, batch: int, steps: int, extra=None, bf16: bool = False) -> float:
    """Samples/s of fwd + bwd + AdamW (+ ``extra()``, the official per-step encoders) on one fixed random batch,
    the forward under bf16 autocast when ``bf16``."""
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.codebook_size, (batch, model.seq_len))
    reps = torch.randn(batch, model.rep_dim)
    model.train()
    for i in range(steps + 1):
        if i == 1:
            tic = time.perf_counter()
        if extra is not None:
            extra()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = masked_token_loss(model, tokens, reps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
    return steps * batch / (time.perf_counter() - tic)


@torch.no_grad()
def decode_rate(model: MAGE, batch: int, guidance: float) -> float:
    model.eval()
    cond = model.condition(torch.randn(batch, model.rep_dim))
    decode_tokens(model, cond, torch.Generator().manual_seed(0), num_iter=2, guidance=guidance)  # warm-up
    tic = time.perf_counter()
    decode_tokens(model, cond, torch.Generator().manual_seed(0), num_iter=20, choice_temperature=6.0,
                  guidance=guidance)
    return batch / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=Params().pixel.train.batch_size)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--mage-b", type=int, default=0, help="batch of the MAGE-B comparison (0: skip it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    defaults = Params()
    grid = defaults.views.crop // 2 ** (len(defaults.tokenizer.model.ch_mult) - 1)
    codebook, dim = defaults.tokenizer.model.n_embed, defaults.encoder.model.proj_dim
    torch.manual_seed(0)
    model = MAGE(**mage_kwargs(defaults.pixel.model, codebook, grid * grid, dim, "rep"))
    print(f"MAGE {sum(p.numel() for p in model.parameters()):,} params, {grid}x{grid} tokens, batch {args.batch}, "
          f"{args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_stores(root, args.images, defaults.views.count, grid, codebook, dim)
        params = validate({"paths": {"data": str(root / "data"), "metrics": str(root / "metrics")},
                           "pixel": {"train": {"steps": args.steps, "batch_size": args.batch, "log_every": 10,
                                               "checkpoint_every": 10 ** 6,
                                               "codebook_init": False},  # synthetic stores: no tokenizer file
                                     "eval": {"num_images": 0}},
                           "runtime": {"threads": args.threads}})
        bare_before = bare_rate(model, args.batch, args.steps)
        stage = run_stage("train_pixel", params, root, item="rep")["samples_per_s"]
        bare_after = bare_rate(model, args.batch, args.steps)
    bare = (bare_before + bare_after) / 2
    print(f"(1) train_pixel {stage:.1f} samples/s, bare step {bare:.1f} (before {bare_before:.1f}, after "
          f"{bare_after:.1f}): ratio {stage / bare:.2f}")
    print(f"    peak RSS: stage process {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB, "
          f"this one {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    vqgan = VQGAN(**model_kwargs(defaults.tokenizer.model)).eval()
    encoder = build_encoder(defaults.encoder.model.model_dump()).eval()
    images = torch.rand(args.batch, 3, defaults.views.crop, defaults.views.crop)

    def official_inputs() -> None:
        with torch.no_grad():
            vqgan.encode_to_indices(images)
            represent(encoder, images)

    official = bare_rate(model, args.batch, max(5, args.steps // 3), official_inputs)
    print(f"(2) official way (tokenizer + encoder per step) {official:.1f} samples/s: ours is "
          f"{bare / official:.2f}x cheaper per sample (bare step), {stage / official:.2f}x (stage)")
    for guidance in (0.0, 1.0):
        print(f"(3) decoding T=20, batch {args.decode_batch}, guidance {guidance}: "
              f"{decode_rate(model, args.decode_batch, guidance):.1f} images/s")
    if args.mage_b:
        mage_b(args.mage_b)
    grid_conv_cost(defaults, grid * grid, codebook, dim, args.batch, args.steps)


def grid_conv_cost(defaults: Params, seq_len: int, codebook: int, dim: int, batch: int, steps: int) -> None:
    """(5): the default MAGE over the same one with ``grid_conv=0``, alternating, fp32 and bf16."""
    kernel = defaults.pixel.model.grid_conv
    if not kernel:
        print("(5) the defaults have no grid convolution: nothing to compare")
        return
    models = {}
    for k in (0, kernel):
        torch.manual_seed(0)
        models[k] = MAGE(**{**mage_kwargs(defaults.pixel.model, codebook, seq_len, dim, "rep"), "grid_conv": k})
    for bf16 in (False, True):
        rates = {k: [] for k in models}
        for _ in range(3):
            for k, model in models.items():
                rates[k].append(bare_rate(model, batch, steps, bf16=bf16))
        plain, local = (float(np.median(rates[k])) for k in (0, kernel))
        print(f"(5) grid_conv {kernel} vs 0, {'bf16' if bf16 else 'fp32'}: {local:.1f} vs {plain:.1f} samples/s, "
              f"step time x{plain / local:.3f}")


def mage_b(batch: int) -> None:
    """(4): one warm-up and two timed steps each way (they take seconds per sample on a CPU)."""
    torch.manual_seed(0)
    model = MAGE(**MAGE_SIZES["mage_base"])
    vqgan = VQGAN().eval()
    encoder = MoCoViT(**VIT_SIZES["base"], img_size=224, patch_size=16, proj_hidden_dim=4096, proj_dim=256).eval()
    images = torch.rand(batch, 3, 256, 256)

    def official_inputs() -> None:
        with torch.no_grad():
            vqgan.encode_to_indices(images)
            represent(encoder, images, input_size=224)

    ours = bare_rate(model, batch, 2)
    official = bare_rate(model, batch, 2, official_inputs)
    print(f"(4) MAGE-B batch {batch}: ours {ours:.3f} samples/s, official way {official:.3f}: "
          f"{ours / official:.2f}x cheaper per sample")
    print(f"(4) MAGE-B decoding T=20, batch {batch}: {decode_rate(model, batch, 0.0):.3f} images/s")


if __name__ == "__main__":
    main()
