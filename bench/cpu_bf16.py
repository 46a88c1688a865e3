"""bf16 autocast on the CPU against exact fp32, for each model of the default run at its default sizes.

Each workload (a training step: forward, backward, AdamW; or a decoding / encoding pass) runs in short bursts,
fp32 and bf16 alternating in one process, so a load change on a shared machine hits both alike; the figure is
the median over rounds of the per-round ratio. bf16 pays only where the CPU has it natively (AVX512-BF16 or
AMX-BF16, :func:`pipeline.core.runtime.cpu_has_native_bf16`); elsewhere oneDNN emulates it and it loses.

    python -m bench.cpu_bf16 [--rounds 6] [--steps 8] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.core.config import load_params
from pipeline.core.runtime import cpu_has_native_bf16
from pipeline.gen.masked_decoding import decode_tokens
from pipeline.models.encoder import build_encoder
from pipeline.models.mage import MAGE, mage_kwargs, masked_token_loss
from pipeline.models.moco import MoCoV3
from pipeline.models.rdm import RDM, rdm_kwargs
from pipeline.models.vqgan import VQGAN, model_kwargs
from pipeline.train.loop import param_groups


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def workloads(params) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one call, items it processes), built from the default run's params."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    size, grid = params.views.crop, params.views.crop // 2 ** (len(params.tokenizer.model.ch_mult) - 1)
    codes, seq = params.tokenizer.model.n_embed, grid * grid
    out: dict[str, tuple[Callable[[], None], int]] = {}

    p = params.encoder
    moco = MoCoV3(build_encoder(p.model.model_dump()), dim=p.model.proj_dim, mlp_dim=p.model.proj_hidden_dim,
                  T=p.train.temperature).train()
    x1, x2 = torch.rand(p.train.batch_size, 3, size, size), torch.rand(p.train.batch_size, 3, size, size)
    backbone = "ViT" if p.model.arch == "vit" else "ResNet"
    out[f"encoder step (MoCo v3 {backbone})"] = (train_step(moco, lambda: moco(x1, x2, 0.99)), p.train.batch_size)

    r = params.rdm
    rdm = RDM(**rdm_kwargs(r.model)).train()
    x = torch.randn(r.train.batch_size, r.model.in_channels)
    t = torch.randint(0, r.diffusion.timesteps, (r.train.batch_size,))
    out["RDM step (SimpleMLP)"] = (train_step(rdm, lambda: F.mse_loss(rdm(x, t), x)), r.train.batch_size)

    vq = VQGAN(**model_kwargs(params.tokenizer.model)).train()
    imgs = torch.rand(params.tokenizer.train.batch_size, 3, size, size)

    def vq_loss() -> torch.Tensor:
        rec, qloss, _ = vq(imgs)
        return F.mse_loss(rec.float(), imgs) + qloss.float().mean()

    out["tokenizer step (VQGAN, no disc)"] = (train_step(vq, vq_loss), params.tokenizer.train.batch_size)

    pm = params.pixel
    mage = MAGE(**mage_kwargs(pm.model, codes, seq, 256, "rep")).train()
    tokens = torch.randint(codes, (pm.train.batch_size, seq), generator=g)
    reps = torch.randn(pm.train.batch_size, 256)
    out["pixel step (MAGE)"] = (train_step(mage, lambda: masked_token_loss(mage, tokens, reps, g)[0]),
                                pm.train.batch_size)

    batch = params.sample.batch_size
    cond_reps = torch.randn(batch, 256)

    def decode() -> None:
        with torch.no_grad():
            mage.eval()
            decode_tokens(mage, mage.condition(cond_reps), torch.Generator().manual_seed(0),
                          num_iter=params.sample.settings["rcg_cfg"].iterations, guidance=1.0)
            mage.train()

    out["decode, guided (MAGE, 10 iterations)"] = (decode, batch)
    ids = torch.randint(codes, (batch, grid, grid), generator=g)

    def vq_decode() -> None:
        with torch.no_grad():
            vq.decode_indices(ids)

    out["VQGAN decode"] = (vq_decode, batch)
    return out


def rate(fn: Callable[[], None], items: int, steps: int, bf16: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        fn()  # warm-up (oneDNN primitive caches)
        tic = time.perf_counter()
        for _ in range(steps):
            fn()
    return steps * items / (time.perf_counter() - tic)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None, params=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    params = params or load_params(None, args.overrides)
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"native bf16: {cpu_has_native_bf16()}")
    print("| workload | items/s fp32 | items/s bf16 | bf16 / fp32 (median of rounds) |\n|---|---:|---:|---:|")
    for name, (fn, items) in workloads(params).items():
        fp32, bf16 = [], []
        for _ in range(args.rounds):
            fp32.append(rate(fn, items, args.steps, False))
            bf16.append(rate(fn, items, args.steps, True))
        ratio = statistics.median(b / f for b, f in zip(bf16, fp32))
        print(f"| {name} | {statistics.median(fp32):.0f} | {statistics.median(bf16):.0f} | {ratio:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
