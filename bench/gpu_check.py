"""GPU readiness in one run, without any file: official-size models with random weights, made here, through the
project's own code (the cost of a step does not depend on the weights).

    python -m bench.gpu_check [--out gpu_check.json] [--modes fp32 bf16 bf16+compile] [--skip-ddp]
    python -m bench.gpu_check --tiny      # toy sizes on the CPU: what tests/test_gpu_check.py runs
    python -m bench.gpu_check --flops-only  # FLOPs per item at full size, no timing (any device)

Workloads, each timed in every mode (fp32 eager is the baseline; the table gives every mode's ratio to it):

- ``encode``: MoCo v3 ViT-B/16 at 224 on 256 px views, through ``pipeline.models.view_encoder.encoder_fn`` (uint8
  views in, standardised reps out: what the encode stage runs per batch);
- ``rdm_step``: the paper's RDM (SimpleMLP 1536 x 12) training step as ``pipeline.train.rdm`` runs it (x0 loss,
  LitEma update, fused AdamW) on ``pipeline.train.loop.TrainLoop`` (its bf16 autocast and ``torch.compile``);
- ``mage_step``: MAGE-B with the official vocabulary (2025 ids), dropout 0.1, as ``pipeline/train/pixel.py`` trains
  it (``masked_token_loss``, AdamW (0.9, 0.95) without decay on biases/1-D, clip 3) on the same loop;
- ``sample``: RCG-B sampling with guidance through ``pipeline.gen.rcg.generate``: RDM 250 DDIM steps (eta 1), 20
  MAGE decoding steps with guidance 1 (one 2B batch), the official VQGAN decoder at 256; images/s against the
  paper's 3.6 images/s per V100.

Then a 1-GPU ``torchrun`` pass through NCCL (gloo under ``--tiny``): init, all-reduce, a DDP backward, barrier,
destroy (``bench/ddp_check.py``). Per workload: throughput, peak GPU memory (``torch.cuda.max_memory_allocated``,
weights and optimizer included), FLOPs per item (counted by ``torch.utils.flop_counter`` on one item: matmuls,
convolutions, attention) and the TFLOP/s they imply. ``--flops-only`` adds tokenising one 256 px view.
Modes: ``bf16`` autocasts where the project's code does (the training loop, encode, MAGE decoding and the VQGAN;
the RDM samples in fp32, as RCG); ``+compile`` compiles the models (``runtime.compile`` for the training loop,
``nn.Module.compile`` for the inference models, which the stages do not compile: it shows what it would buy).
``--tiny`` runs fp32 and fp32+compile on the CPU, compiled with the eager backend (traced, no C++ build).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ddp_check import check_ddp  # noqa: E402
from pipeline.core.config import Params, Paths, RdmModel, RdmSample, Runtime, SampleSetting  # noqa: E402
from pipeline.core.distributed import Dist  # noqa: E402
from pipeline.models.view_encoder import encoder_fn  # noqa: E402
from pipeline.models.diffusion import GaussianDiffusion  # noqa: E402
from pipeline.losses.diffusion import x0_loss  # noqa: E402
from pipeline.gen.rcg import LoadedPixel, LoadedRdm, Models, generate  # noqa: E402
from pipeline.models.encoder import MoCoViT, represent  # noqa: E402
from pipeline.models.mage import MAGE, MAGE_SIZES, masked_token_loss  # noqa: E402
from pipeline.models.rdm import RDM, rdm_kwargs  # noqa: E402
from pipeline.models.vqgan import VQGAN  # noqa: E402
from pipeline.models.ema import EMA  # noqa: E402
from pipeline.train.loop import TrainLoop, param_groups  # noqa: E402

OFFICIAL_RATE_V100 = 3.6  # RCG-B images/s per V100 (the paper), the anchor of the sample row
WORKLOADS = ("encode", "rdm_step", "mage_step", "sample")


@dataclass(frozen=True)
class Sizes:
    """Model sizes, batches and how many calls to warm up (compile) and to time, per workload."""
    name: str
    encoder: dict
    image: int
    rdm: dict
    mage: dict
    vqgan: dict
    batch: dict
    warmup: dict
    timed: dict
    rdm_steps: int = 250   # RCG's DDIM steps and decoding iterations (fewer under --tiny: the same code, cheaper)
    iterations: int = 20
    guidance: float = 1.0


FULL = Sizes(
    name="official",
    encoder=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, proj_hidden_dim=4096,
                 proj_dim=256),
    image=256,
    rdm=dict(in_channels=256, model_channels=1536, num_res_blocks=12, whiten_power=0.0),
    mage=MAGE_SIZES["mage_base"],
    vqgan=dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, embed_dim=256, n_embed=1024),
    # encode and sample: the ImageNet presets' batches; the RDM: the official global 512 on one GPU; MAGE-B: the
    # official 64 per GPU (the preset's 4096 is 64 GPUs x 64)
    batch=dict(encode=256, rdm_step=512, mage_step=64, sample=64),
    warmup=dict(encode=2, rdm_step=10, mage_step=5, sample=1),
    timed=dict(encode=10, rdm_step=50, mage_step=20, sample=2),
)

TINY = Sizes(
    name="tiny",
    encoder=dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, proj_hidden_dim=64, proj_dim=16),
    image=16,
    rdm=dict(in_channels=16, time_embed_dim=32, model_channels=32, num_res_blocks=2, whiten_power=0.0),
    mage=dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    vqgan=dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, n_embed=64),
    batch=dict(encode=8, rdm_step=16, mage_step=8, sample=4),
    warmup=dict(encode=1, rdm_step=1, mage_step=1, sample=1),
    timed=dict(encode=2, rdm_step=2, mage_step=2, sample=1),
    rdm_steps=50,
    iterations=8,
)


@dataclass
class Result:
    """One workload: its unit, batch, FLOPs per item and, per mode, rate (items/s), peak GiB and extras."""
    unit: str
    batch: int
    gflop_per_item: float
    modes: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_peak(device: torch.device) -> None:
    """Free what the last run left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def gflop(fn: Callable[[], object]) -> float:
    """GFLOPs of one call of ``fn`` (what torch's FLOP counter sees: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def seconds_per_call(fn: Callable[[], object], warmup: int, timed: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    tic = time.perf_counter()
    for _ in range(timed):
        fn()
    sync(device)
    return (time.perf_counter() - tic) / timed


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """``torch.compile`` with ``backend`` wherever the project's code calls it (``TrainLoop.wrap`` names none)."""
    real = torch.compile
    if backend != "inductor":
        torch.compile = functools.partial(real, backend=backend)
    try:
        yield
    finally:
        torch.compile = real


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """``count`` intra-op threads for a while (None: unchanged): the toy sizes use one, because on a shared CPU
    two threads of tiny ops mostly wait on each other."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mode_flags(mode: str) -> tuple[bool, bool]:
    """(bf16, compile) of a mode name such as ``fp32``, ``bf16``, ``bf16+compile``, ``fp32+compile``."""
    precision, _, rest = mode.partition("+")
    if precision not in ("fp32", "bf16") or rest not in ("", "compile"):
        raise SystemExit(f"unknown mode {mode!r} (fp32, bf16, fp32+compile, bf16+compile)")
    return precision == "bf16", rest == "compile"


def random_reps(batch: int, dim: int, device: torch.device) -> torch.Tensor:
    """Standardised reps (per-sample mean 0, std 1), as the stores hold them."""
    r = torch.randn(batch, dim, device=device)
    return (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)


def build_mage(s: Sizes, device: torch.device) -> MAGE:
    grid = s.image // 2 ** (len(s.vqgan["ch_mult"]) - 1)
    return MAGE(codebook_size=s.vqgan["n_embed"], seq_len=grid * grid, rep_dim=s.encoder["proj_dim"],
                conditioning="rep", vocab="official", dropout=0.1, **s.mage).to(device)


# ------------------------------------------------------------------------------------------- workloads
# Each check counts the FLOPs of one item on a model of its own, then runs every mode in a function whose models,
# optimizer and closures are gone when it returns, so that each mode's peak memory is its own.
def per_mode(modes: list[str], device: torch.device, run: Callable[[bool, bool], dict]) -> dict[str, dict]:
    """``run(bf16, compiled)`` for each mode, from a freed GPU and a reset peak; -> {mode: its figures}."""
    out = {}
    for mode in modes:
        fresh_peak(device)
        out[mode] = {**run(*mode_flags(mode)), "peak_gib": peak_gib(device)}
    return out


def check_encode(s: Sizes, modes: list[str], device: torch.device) -> Result:
    def build() -> MoCoViT:
        torch.manual_seed(0)
        return MoCoViT(**s.encoder).to(device).eval()

    b = s.batch["encode"]
    views = torch.randint(0, 256, (b, 1, s.image, s.image, 3), dtype=torch.uint8)
    one = views[:1].to(device).reshape(1, s.image, s.image, 3).permute(0, 3, 1, 2).float().div(255)
    result = Result("images/s", b, gflop(functools.partial(represent, build(), one, s.encoder["img_size"])))

    def run(bf16: bool, compiled: bool) -> dict:
        model = build()
        if compiled:  # the trunk's blocks and the projector: all of the encoder's FLOPs
            model.blocks.compile()
            model.head.compile()
        fn = encoder_fn(model, device, bf16)
        return {"rate": b / seconds_per_call(lambda: fn(views), s.warmup["encode"], s.timed["encode"], device)}

    result.modes = per_mode(modes, device, run)
    return result


def loop_rate(name: str, model: nn.Module, step: Callable, batch_item: tuple, optimizer: torch.optim.Optimizer,
              batch: int, warmup: int, timed: int, bf16: bool, compiled: bool, grad_clip: float | None,
              device: torch.device) -> float:
    """Samples/s of ``timed`` iterations of the project's training loop after ``warmup`` ones (compilation): the
    loop logs after the warm-up and at the end (one host sync each), and those two moments are the clock."""
    root = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    try:
        params = Params(paths=Paths(data=root / "data", metrics=root / "metrics"), runtime=Runtime(compile=compiled))
        loop = TrainLoop(f"gpu_check_{name}", params, Dist(), device, steps=warmup + timed,
                         identity={"gpu_check": name}, modules={"model": model}, optimizer=optimizer,
                         log_every=warmup, checkpoint_every=10**9, samples_per_step=batch, grad_clip=grad_clip,
                         bf16=bf16)
        net = loop.wrap(model)
        clock: dict[int, float] = {}

        def on_log(step_done: int, means: dict) -> dict:
            clock[step_done] = time.perf_counter()
            return {}

        loop.run(lambda item, it: step(net, item), iter(lambda: batch_item, None), on_log=on_log)
        return timed * batch / (clock[warmup + timed] - clock[warmup])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_rdm_step(s: Sizes, modes: list[str], device: torch.device) -> Result:
    b = s.batch["rdm_step"]
    diffusion = GaussianDiffusion().to(device)
    kwargs = rdm_kwargs(RdmModel(**s.rdm))
    x0 = random_reps(b, s.rdm["in_channels"], device)
    y = torch.zeros(b, dtype=torch.long, device=device)
    gen = torch.Generator(device).manual_seed(0)

    def build() -> RDM:
        torch.manual_seed(0)
        model = RDM(**kwargs).to(device)
        model.cond_stage_model.requires_grad_(False)  # unconditional: the one class row is never read
        return model

    def one_step() -> None:
        x0_loss(diffusion, build(), x0[:1], y[:1], gen).backward()

    result = Result("samples/s", b, gflop(one_step))

    def run(bf16: bool, compiled: bool) -> dict:
        model = build()
        ema = EMA(model.net)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5.12e-4,
                                      weight_decay=0.01, fused=True)

        def step(net: nn.Module, item: tuple) -> dict:
            ema.update(model.net)  # as pipeline.train.rdm: LitEma inside the forward, before the optimizer step
            return {"loss": x0_loss(diffusion, net, *item)}

        return {"rate": loop_rate("rdm", model, step, (x0, y, gen), optimizer, b, s.warmup["rdm_step"],
                                  s.timed["rdm_step"], bf16, compiled, None, device)}

    result.modes = per_mode(modes, device, run)
    return result


def check_mage_step(s: Sizes, modes: list[str], device: torch.device) -> Result:
    def build() -> MAGE:
        torch.manual_seed(0)
        return build_mage(s, device).train()

    b = s.batch["mage_step"]
    seq_len = (s.image // 2 ** (len(s.vqgan["ch_mult"]) - 1)) ** 2
    tokens = torch.randint(0, s.vqgan["n_embed"], (b, seq_len), device=device)
    reps = random_reps(b, s.encoder["proj_dim"], device)
    gen = torch.Generator(device).manual_seed(0)
    result = Result("samples/s", b, gflop(lambda: masked_token_loss(build(), tokens[:1], reps[:1], gen)[0].backward()))

    def run(bf16: bool, compiled: bool) -> dict:
        model = build()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=2.4e-3, betas=(0.9, 0.95), fused=True)

        def step(net: nn.Module, item: tuple) -> dict:
            loss, accuracy = masked_token_loss(model, *item, net=net)
            return {"loss": loss, "accuracy": accuracy}

        return {"rate": loop_rate("mage", model, step, (tokens, reps, gen), optimizer, b, s.warmup["mage_step"],
                                  s.timed["mage_step"], bf16, compiled, 3.0, device)}

    result.modes = per_mode(modes, device, run)
    return result


def check_sample(s: Sizes, modes: list[str], device: torch.device) -> Result:
    side = s.image // 2 ** (len(s.vqgan["ch_mult"]) - 1)

    def build() -> Models:
        """Random-weight models wired as the sample stage wires loaded ones."""
        torch.manual_seed(0)
        tokenizer = VQGAN(**s.vqgan).to(device).eval().requires_grad_(False)
        rdm = RDM(**rdm_kwargs(RdmModel(**s.rdm))).to(device).eval().requires_grad_(False)
        mage = build_mage(s, device).eval().requires_grad_(False)
        pixel = LoadedPixel(mage, "rep", (side, side), mage.codebook_size, mage.rep_dim, None, None, None, "random")
        return Models(pixel, tokenizer, "random", LoadedRdm(rdm, GaussianDiffusion().to(device), None, "random"))

    @torch.inference_mode()
    def one_image(models: Models) -> float:
        """GFLOPs of one image: the RDM's steps, the guided decoding steps (2 rows each), one VQGAN decode."""
        rdm, mage = models.rdm.model, models.pixel.model
        t = torch.ones(1, dtype=torch.long, device=device)
        ids = torch.full((2, mage.seq_len), mage.mask_id, device=device)
        codes = torch.zeros(1, side, side, dtype=torch.long, device=device)
        return (s.rdm_steps * gflop(lambda: rdm(random_reps(1, s.rdm["in_channels"], device), t))
                + s.iterations * gflop(lambda: mage(ids, mage.null_condition(2)))
                + gflop(lambda: models.tokenizer.decode_indices(codes)))

    setting = SampleSetting(generator="rep", reps="rdm", guidance=s.guidance, iterations=s.iterations,
                            temperature=6.0)
    sampler = RdmSample(steps=s.rdm_steps, eta=1.0)
    b = s.batch["sample"]
    result = Result("images/s", b, one_image(build()))

    def run(bf16: bool, compiled: bool) -> dict:
        models = build()
        if compiled:  # the three networks; the DDIM and decoding loops around them stay Python
            for module in (models.rdm.model, models.pixel.model, models.tokenizer.decoder):
                module.compile()
        passes: dict[str, float] = {}
        gen = torch.Generator(device).manual_seed(0)

        def batch() -> None:
            out = generate(models, setting, sampler, b, gen, timings=passes, bf16=bf16)
            if out.images.shape != (b, s.image, s.image, 3):
                raise SystemExit(f"sample: images of shape {out.images.shape}, expected {(b, s.image, s.image, 3)}")

        for _ in range(s.warmup["sample"]):
            batch()
        passes.clear()  # the split of the timed batches only, not of the warm-up (compilation)
        rate = b / seconds_per_call(batch, 0, s.timed["sample"], device)
        figures = {"rate": rate, "seconds_per_batch": {k: round(v / s.timed["sample"], 4) for k, v in passes.items()}}
        if s.name == "official":  # the paper's rate is RCG-B's: only the official sizes compare with it
            figures["vs_official_v100"] = rate / OFFICIAL_RATE_V100
        return figures

    result.modes = per_mode(modes, device, run)
    return result


CHECKS = {"encode": check_encode, "rdm_step": check_rdm_step, "mage_step": check_mage_step, "sample": check_sample}


def count_only(s: Sizes, device: torch.device) -> dict[str, float]:
    """GFLOPs per item of every workload, and of tokenising one view with the VQGAN encoder, without timing."""
    out = {name: CHECKS[name](s, [], device).gflop_per_item for name in WORKLOADS}
    vqgan = VQGAN(**s.vqgan).to(device).eval()
    with torch.inference_mode():
        out["tokenize"] = gflop(lambda: vqgan.encode_to_indices(torch.rand(1, 3, s.image, s.image, device=device)))
    return out


# ------------------------------------------------------------------------------------------------ main
def table(results: dict[str, Result], baseline: str) -> list[str]:
    rows = ["| workload | mode | batch | rate | vs " + baseline + " | peak GPU GiB | GFLOP/item | TFLOP/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        base = r.modes.get(baseline, {}).get("rate")
        for mode, m in r.modes.items():
            ratio = f"{m['rate'] / base:.2f}x" if base else "-"
            peak = "-" if m["peak_gib"] is None else f"{m['peak_gib']:.2f}"
            extra = f" ({m['vs_official_v100']:.2f}x the official 3.6/V100)" if "vs_official_v100" in m else ""
            rows.append(f"| {name} | {mode} | {r.batch} | {m['rate']:.1f} {r.unit}{extra} | {ratio} | {peak} | "
                        f"{r.gflop_per_item:.3g} | {m['rate'] * r.gflop_per_item / 1e3:.3g} |")
    return rows


def environment(device: torch.device, sizes: Sizes, backend: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "sizes": sizes.name, "compile_backend": backend, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (gloo, compile traced eagerly)")
    ap.add_argument("--modes", nargs="+", default=None,
                    help="default: fp32 bf16 bf16+compile on a GPU, fp32 fp32+compile with --tiny")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--flops-only", action="store_true", help="FLOPs per item of every workload, no timing")
    args = ap.parse_args(argv)
    os.environ.setdefault("RCG_PROGRESS", "0")  # the loop's progress bars would interleave with the table
    sizes = TINY if args.tiny else FULL
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.flops_only:
        flops = count_only(sizes, device)
        print(json.dumps({"sizes": sizes.name, "gflop_per_item": flops}, indent=1))
        args.out.write_text(json.dumps({"environment": environment(device, sizes, "-"), "gflop_per_item": flops},
                                       indent=1))
        return
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: the official sizes need a GPU (--tiny runs toy sizes on the CPU)")
    modes = args.modes or (["fp32", "bf16", "bf16+compile"] if cuda else ["fp32", "fp32+compile"])
    for mode in modes:
        mode_flags(mode)
    backend = "inductor" if cuda else "eager"
    tic = time.perf_counter()
    results = {}
    with compile_backend(backend), torch_threads(1 if args.tiny else None):
        for name in args.workloads:
            results[name] = CHECKS[name](sizes, modes, device)
            torch._dynamo.reset()  # each workload compiles afresh, as a stage process would
            print(f"{name}: done at {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
    ddp = None if args.skip_ddp else check_ddp("nccl" if cuda else "gloo")
    report = {"environment": environment(device, sizes, backend), "official_rate_v100": OFFICIAL_RATE_V100,
              "workloads": {name: vars(r) for name, r in results.items()}, "ddp": ddp,
              "seconds": round(time.perf_counter() - tic, 1)}
    args.out.write_text(json.dumps(report, indent=1))
    env = report["environment"]
    print(f"{env.get('gpu', 'CPU')}, torch {env['torch']}, sizes {sizes.name}, compile backend {backend}")
    print("\n".join(table(results, modes[0])))
    if ddp is not None:
        state = "ok" if ddp["ok"] else f"FAILED: {ddp.get('error', 'a check failed')}"
        print(f"torchrun 1 process, {ddp['backend']}: {state} (init {ddp.get('init_s', '-')} s, whole launch "
              f"{ddp['launch_s']} s)")
    print(f"{report['seconds']} s in all; JSON in {args.out}")
    if ddp is not None and not ddp["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
