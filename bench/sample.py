"""Sampling throughput: RCG's two passes end to end, split into RDM sampling, masked-token decoding and VQGAN
decoding, on random-weight models of a named size (the cost does not depend on the weights).

    python -m bench.sample [--sizes default mage_b] [--batch B] [--iterations T] [--rdm-steps S] [--threads N]
                           [--eager]

``default``: the default run's models (RDM 512 x 4, MAGE 128/4 + 128/2, VQGAN f=4, 32 px, 8x8 tokens).
``mage_b``: MAGE-B (768/12 + 768/8) and the official VQGAN (ch 128, [1,1,2,2,4], 256 px, 16x16 tokens) with
the paper's RDM (1536 x 12). On CPU it runs few decoding iterations on one small batch: the decoding cost is
linear in the iterations (each is one forward of the same batch), so the 20-iteration rate is extrapolated
from the measured per-iteration time, and the report says so. Guidance (rcg_cfg) doubles the decoding batch.
``--eager`` also times our decoding loop (guidance as one 2B batch, SDPA) against a plain eager one (a second
forward for the unconditional branch, explicit attention) on the first size, same draws, with their agreement.
On CPU every pass is timed in this process's CPU seconds on one thread (the default ``--threads 1``): on the
shared development machine wall time measures the neighbours, CPU time the code.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import Params  # noqa: E402
from pipeline.models.diffusion import GaussianDiffusion  # noqa: E402
from pipeline.gen.masked_decoding import decode_tokens, gumbel  # noqa: E402
from pipeline.gen.rcg import LoadedPixel, LoadedRdm, Models  # noqa: E402
from pipeline.models.mage import MAGE, MAGE_SIZES, Attention, mage_kwargs  # noqa: E402
from pipeline.models.rdm import RDM, rdm_kwargs  # noqa: E402
from pipeline.samplers.diffusion import sample_reps  # noqa: E402
from pipeline.models.vqgan import VQGAN, model_kwargs  # noqa: E402

OFFICIAL_VQGAN = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, embed_dim=256, n_embed=1024)
PAPER_RDM = dict(model_channels=1536, num_res_blocks=12)


def build(size: str, device: torch.device) -> Models:
    """Random-weight models of a named size, wired as the sample stage wires loaded ones."""
    p = Params()
    torch.manual_seed(0)
    if size == "default":
        vq, crop, rdm_over, mage_over = model_kwargs(p.tokenizer.model), p.views.crop, {}, {}
    elif size == "mage_b":
        vq, crop, rdm_over, mage_over = {**OFFICIAL_VQGAN, "beta": 0.25}, 256, PAPER_RDM, MAGE_SIZES["mage_base"]
    else:
        raise SystemExit(f"unknown size {size!r} (default, mage_b)")
    tokenizer = VQGAN(**vq).eval().to(device)
    side = crop // tokenizer.downsample_factor
    rdm_model = p.rdm.model.model_copy(update=rdm_over)
    rdm = RDM(**rdm_kwargs(rdm_model)).eval().to(device)
    mage_model = p.pixel.model.model_copy(update=mage_over)
    mage = MAGE(**mage_kwargs(mage_model, tokenizer.quantize.n_embed, side * side, rdm_model.in_channels,
                              "rep")).eval().to(device)
    pixel = LoadedPixel(mage, "rep", (side, side), mage.codebook_size, mage.rep_dim, None, None, None, "bench")
    return Models(pixel, tokenizer, "bench", LoadedRdm(rdm, GaussianDiffusion().to(device), None, "bench"))


def measure(models: Models, batch: int, iterations: int, rdm_steps: int, guidance: float,
            device: torch.device, warm_up: bool = True) -> dict:
    """Seconds per pass for one batch: the passes :func:`pipeline.gen.rcg.generate` runs, called one by one so each
    is timed in CPU seconds of this process (on one thread: its uncontended wall time, however busy the shared
    machine is) or, on a GPU, in synchronised wall seconds. A warm-up batch first unless ``warm_up`` is off (a CPU
    pass of seconds gains nothing from one)."""
    mage, rdm = models.pixel.model, models.rdm
    gen = torch.Generator(device).manual_seed(0)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def passes() -> dict:
        out, clock = {}, Clock(device)
        with torch.inference_mode():
            reps = sample_reps(rdm.model, rdm.diffusion, labels, steps=rdm_steps, generator=gen)
            out["rdm_s"] = clock()
            tokens = decode_tokens(mage, mage.condition(reps), gen, num_iter=iterations, guidance=guidance)
            out["decode_s"] = clock()
            models.tokenizer.decode_indices(tokens.view(batch, *models.pixel.grid))
            out["vqgan_s"] = clock()
        return out

    if warm_up:
        passes()
    return {"batch": batch, "iterations": iterations, "rdm_steps": rdm_steps, "guidance": guidance, **passes()}


class Clock:
    """Seconds since the last call: process CPU time on CPU, synchronised wall time on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.now = time.perf_counter if device.type == "cuda" else time.process_time
        self.last = self.now()

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


@contextlib.contextmanager
def explicit_attention():
    """Swap MAGE's SDPA attention for softmax(q k^T / sqrt(d)) v written out (fp32, as the official)."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q.float() @ k.float().transpose(-2, -1) * (c // self.num_heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v.float()).to(v.dtype).transpose(1, 2).reshape(b, n, c))

    original = Attention.forward
    Attention.forward = forward
    try:
        yield
    finally:
        Attention.forward = original


@torch.no_grad()
def eager_decode(model: MAGE, cond: torch.Tensor, generator: torch.Generator, num_iter: int,
                 choice_temperature: float, guidance: float) -> torch.Tensor:
    """MAGE's decoding written plainly (the reference for ours): the unconditional branch as a second forward
    of its own, the slot vectors rebuilt every step, explicit attention (under :func:`explicit_attention`). The
    same draws from ``generator`` in the same order as ``decode_tokens``, so the two agree token for token up to
    floating-point ties."""
    b, n = len(cond), model.seq_len
    ids = torch.full((b, n), model.mask_id, dtype=torch.long, device=cond.device)
    sampled = ids
    for step in range(num_iter):
        logits = model(ids, cond.clone()).float()
        if guidance > 0:
            uncond = model(ids, model.null_condition(b).clone()).float()
            logits = logits + guidance * (step + 1) / num_iter * (logits - uncond)
        logp = torch.log_softmax(logits, -1)
        unknown = ids == model.mask_id
        draw = (logp + gumbel(logp.shape, generator, cond.device)).argmax(-1)
        sampled = torch.where(unknown, draw, ids)
        ratio = (step + 1) / num_iter
        n_mask = torch.floor(n * torch.full((b, 1), math.cos(math.pi / 2 * ratio), dtype=torch.float64))
        n_mask = torch.maximum(torch.ones_like(n_mask), torch.minimum(unknown.sum(1, keepdim=True) - 1, n_mask))
        confidence = logp.gather(-1, draw[..., None])[..., 0]
        confidence = confidence + choice_temperature * (1 - ratio) * gumbel(confidence.shape, generator, cond.device)
        confidence = confidence.masked_fill(~unknown, math.inf)
        cutoff = confidence.sort(-1).values.gather(-1, n_mask.long() - 1)
        ids = torch.where((confidence <= cutoff) & unknown.any(1, keepdim=True), model.mask_id, sampled)
    return sampled


def eager_vs_ours(models: Models, batch: int, iterations: int, guidance: float, device: torch.device) -> str:
    """Decoding seconds of ``decode_tokens`` over the plain eager loop, same model, inputs and draws."""
    mage = models.pixel.model
    cond = mage.condition(torch.randn(batch, mage.rep_dim, generator=torch.Generator().manual_seed(1)).to(device))
    clock, out = Clock(device), {}
    with torch.inference_mode():
        ours = decode_tokens(mage, cond, torch.Generator(device).manual_seed(0), num_iter=iterations,
                             guidance=guidance)
        out["ours"] = clock()
        with explicit_attention():
            eager = eager_decode(mage, cond, torch.Generator(device).manual_seed(0), iterations, 6.0, guidance)
        out["eager"] = clock()
    agree = (ours == eager).float().mean().item()
    return (f"| {guidance} | {batch} | {iterations} | {1000 * out['ours'] / batch:.1f} | "
            f"{1000 * out['eager'] / batch:.1f} | {out['eager'] / out['ours']:.2f}x | {agree:.4f} |")


def report(size: str, row: dict, target_iterations: int, target_rdm_steps: int) -> str:
    """One table row: milliseconds per image of each pass at ``target_*`` (scaled linearly from what was run)."""
    b = row["batch"]
    ms = {"rdm": row["rdm_s"] * target_rdm_steps / row["rdm_steps"],
          "decode": row["decode_s"] * target_iterations / row["iterations"], "vqgan": row["vqgan_s"]}
    ms = {k: 1000 * v / b for k, v in ms.items()}
    total = sum(ms.values())
    scaled = "" if (row["iterations"], row["rdm_steps"]) == (target_iterations, target_rdm_steps) else \
        f" measured at T={row['iterations']}, {row['rdm_steps']} RDM steps; scaled linearly"
    return (f"| {size} | {row['guidance']} | {b} | {ms['rdm']:.1f} | {ms['decode']:.1f} | {ms['vqgan']:.1f} | "
            f"{total:.1f} | {1000 / total:.2f} |{scaled}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["default", "mage_b"])
    ap.add_argument("--batch", type=int, default=None, help="default: 50 (default size), 1 (mage_b on CPU)")
    ap.add_argument("--iterations", type=int, default=None, help="measured decoding iterations (default: 20 / 2)")
    ap.add_argument("--rdm-steps", type=int, default=None, help="measured RDM steps (default: 250 / 25)")
    ap.add_argument("--eager", action="store_true", help="also time our decoding loop against a plain eager one")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default); 1 by default: "
                    "on a shared CPU two threads ran the default MAGE 10x slower than one")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kind = "wall" if device.type == "cuda" else "CPU"
    print(f"device {device}, {torch.get_num_threads()} threads, load average {load:.1f}; {kind} ms per image at "
          "T=20, 250 RDM steps")
    print("| size | guidance | batch | RDM ms | masked decoding ms | VQGAN ms | end to end ms | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        models = build(size, device)
        small = size != "default" and device.type == "cpu"
        batch = args.batch or (1 if small else 50)
        iterations = args.iterations or (2 if small else 20)
        steps = args.rdm_steps or (25 if small else 250)
        for guidance in (0.0, 1.0):
            row = measure(models, batch, iterations, steps, guidance, device, warm_up=not small)
            print(report(size, row, 20, 250), flush=True)
    if args.eager:
        print(f"\ndecoding, {args.sizes[0]} size: ours (one 2B batch for guidance, SDPA) vs the plain eager loop "
              "(CPU ms per image)")
        print("| guidance | batch | T | ours ms | eager ms | eager / ours | tokens equal |")
        print("|---|---|---|---|---|---|---|")
        models = build(args.sizes[0], device)
        small = args.sizes[0] != "default" and device.type == "cpu"
        for guidance in (0.0, 1.0):
            print(eager_vs_ours(models, args.batch or (1 if small else 50), args.iterations or (2 if small else 20),
                                guidance, device), flush=True)


if __name__ == "__main__":
    main()
