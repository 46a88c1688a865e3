"""RDM training throughput: the stage's loop on cached reps vs bare compute, and vs the official way.

    python -m bench.rdm [--sizes default cifar10 imagenet] [--steps N] [--rounds R] [--threads T]

(1) cached / bare: samples/s of ``pipeline.train.rdm.train_rdm`` on the shared loop (batch gather from the
    in-memory store, random views, noising, AdamW, EMA, loss checks, curves) over the bare forward + backward of
    the same RDM on fixed random tensors, in the same process, interleaved; target >= 0.9. Also over bare fwd/bwd + AdamW + EMA
    (what the official recipe computes per step anyway), which isolates the data path's own cost.
(2) cached / official: the official recipe runs the frozen encoder (fp32, as RCG) on every image at every
    step; here that is the encoder forward on ready-made 256x256 (ImageNet, ViT-B/16 at 224) or 32x32 (default)
    crops plus the same bare RDM step. JPEG decoding and cropping, which the official loader also pays, are
    left out, so the speed-up is a lower bound.
Checkpoint writes are left out of (1): they are I/O every ``checkpoint_every`` steps, not per-step cost.
Run it as a module: ``python bench/rdm.py`` would put bench/ first on sys.path, where bench/tokenize.py
shadows the standard library's tokenize.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import Params, preset, validate  # noqa: E402
from pipeline.core.distributed import Dist  # noqa: E402
from pipeline.data.rep_store import RepStore, store_stats  # noqa: E402
from pipeline.models.ema import EMA  # noqa: E402
from pipeline.models.encoder import build_encoder, represent  # noqa: E402
from pipeline.models.rdm import RDM, rdm_kwargs  # noqa: E402
from pipeline.train.state import TrainState  # noqa: E402
from pipeline.train.rdm import train_rdm  # noqa: E402


def setting(name: str) -> tuple[Params, int, int]:
    """(params, views, image size fed to the encoder) of a named size."""
    if name == "default":
        return Params(), Params().views.count, Params().views.crop
    p = preset("imagenet256_vitb" if name == "imagenet" else name)
    tree = p.model_dump(mode="json")
    if name == "imagenet":
        tree["rdm"]["train"]["batch_size"] = 128  # one GPU's share of the official global 4 x 128
    tree["runtime"]["device"] = "auto"
    return validate(tree), p.views.count, p.views.crop


def cached_rate(params: Params, store: RepStore, device: torch.device, steps: int) -> float:
    """Samples/s of the stage's own loop, differential (an S-step run minus a 1-step run), so start-up and
    the first step's allocations count for neither side."""
    seconds, stats = [], store_stats(store.reps)
    for n in (1, steps):
        with tempfile.TemporaryDirectory() as tmp:
            tree = params.model_dump(mode="json")
            tree["paths"] = {"data": tmp + "/data", "metrics": tmp + "/metrics"}
            tree["rdm"]["train"].update(steps=n, log_every=max(1, steps // 4), checkpoint_every=10 ** 9)
            seconds.append(train_rdm(validate(tree), store, stats, device, Dist())[3]["seconds"])
    return (steps - 1) * params.rdm.train.batch_size / (seconds[1] - seconds[0])


def bare_rate(params: Params, device: torch.device, steps: int, optimizer: bool = True, ema: bool = False) -> float:
    """The same RDM on fixed random tensors: forward, MSE, backward (then the AdamW step, then the EMA)."""
    torch.manual_seed(0)
    model = RDM(**rdm_kwargs(params.rdm.model)).to(device)
    model.cond_stage_model.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01,
                            fused=True)
    shadow = EMA(model.net)
    b, dim = params.rdm.train.batch_size, params.rdm.model.in_channels
    x_t, x0 = torch.randn(b, dim, device=device), torch.randn(b, dim, device=device)
    t, y = torch.randint(0, 1000, (b,), device=device), torch.zeros(b, dtype=torch.long, device=device)

    def step():
        loss = F.mse_loss(model(x_t, t, y), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer:
            opt.step()
        if ema:
            shadow.update(model.net)

    step()
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * b / (time.perf_counter() - tic)


def encoder_rate(params: Params, image_size: int, device: torch.device, batch: int, steps: int) -> float:
    """Images/s of the frozen encoder alone (fp32, eval), on [0,1] crops of the official size."""
    torch.manual_seed(0)
    model = build_encoder(params.encoder.model.model_dump()).to(device).eval()
    x = torch.rand(batch, 3, image_size, image_size, device=device)
    represent(model, x)
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        represent(model, x)
    sync(device)
    return steps * batch / (time.perf_counter() - tic)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_store(params: Params, views: int, device: torch.device) -> RepStore:
    n, dim = max(8192, 8 * params.rdm.train.batch_size), params.rdm.model.in_channels
    reps = torch.randn(n, views, dim)
    reps = (reps - reps.mean(-1, keepdim=True)) / reps.std(-1, keepdim=True)
    return RepStore(Path("<memory>"), reps.to(device), torch.zeros(n, dtype=torch.long, device=device),
                              {"bench": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["default", "imagenet"], choices=["default", "cifar10", "imagenet"])
    ap.add_argument("--steps", type=int, default=0, help="steps per measurement (0: 4 imagenet, else 40 on CPU)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    TrainState.save = lambda self, step, modules, extra=None: None  # checkpoint I/O is not per-step cost
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    rows = []
    for name in args.sizes:
        params, views, image_size = setting(name)
        m, b = params.rdm.model, params.rdm.train.batch_size
        steps = args.steps or (200 if device.type == "cuda" else 4 if name == "imagenet" else 40)
        store = synthetic_store(params, views, device)
        best = {"fwd_bwd": 0.0, "step": 0.0, "step_ema": 0.0, "cached": 0.0}
        for _ in range(args.rounds):  # interleaved; the best (least disturbed) of each is kept
            best["fwd_bwd"] = max(best["fwd_bwd"], bare_rate(params, device, steps, optimizer=False))
            best["cached"] = max(best["cached"], cached_rate(params, store, device, steps))
            best["step"] = max(best["step"], bare_rate(params, device, steps))
            best["step_ema"] = max(best["step_ema"], bare_rate(params, device, steps, ema=True))
        enc_batch = b if device.type == "cuda" else min(b, 16 if name == "imagenet" else 64)
        enc = encoder_rate(params, image_size, device, enc_batch, max(1, steps // 4 if name == "imagenet" else steps))
        official = 1.0 / (1.0 / enc + 1.0 / best["step_ema"])  # encoder on every image + the same RDM step
        rows.append((name, f"{m.model_channels}x{m.num_res_blocks}", b, best["fwd_bwd"], best["step"],
                     best["step_ema"], best["cached"], best["cached"] / best["fwd_bwd"],
                     best["cached"] / best["step_ema"], enc, official, best["cached"] / official))
    header = ("size", "mlp", "batch", "fwd+bwd/s", "+AdamW/s", "+EMA/s", "cached/s", "cached/fwd+bwd",
              "cached/(+EMA)", "encoder img/s", "official/s", "cached/official")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r[0], r[1], str(r[2])] + [f"{v:.1f}" if v >= 10 else f"{v:.3f}" for v in r[3:]]))


if __name__ == "__main__":
    main()
