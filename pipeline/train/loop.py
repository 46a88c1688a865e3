"""The one training loop behind every training stage (pretrain_encoder, train_rdm, train_tokenizer, train_pixel).

A stage builds its model(s), optimizer(s) and batches, and gives the loop a *step function*; the loop owns
everything else: resume (:class:`~pipeline.train.state.TrainState` under a resume identity), the per-iteration lr,
DDP wrapping and ``torch.compile`` (:meth:`TrainLoop.wrap`), bf16 autocast where native (GPU, or a CPU with
AVX512-BF16 / AMX), backward with gradient accumulation, clipping, the optimizer step(s) and the EMA, the deferred
NaN/Inf check, the progress bar, CSV curves, the checkpoint cadence and one summary schema.

Step numbering: iteration ``it`` = 0 .. steps-1 is what the step function, the batches and the lr schedule see
(the number of updates done before it, as MAE-style schedules count). Step ``s = it + 1`` (updates done after
it) is what curves, checkpoints, summaries and error messages name; a state saved at step ``s`` resumes at
iteration ``s``.

The step function ``step_fn(batch, it) -> logs`` returns a dict of scalars (0-d tensors or floats) with at least
``"loss"``. With an ``optimizer`` the loop calls it under autocast, backpropagates ``logs["loss"]`` (divided by
``accum``), clips and steps. A step with several optimizers (the tokenizer: a generator and a discriminator, plus a
codebook EMA) is given none: it runs its forward passes under :meth:`TrainLoop.autocast` and makes each update
through :meth:`TrainLoop.update` (zero_grad, backward, the loop's clipping, step), with each module whose gradients
must be averaged across ranks called through :meth:`TrainLoop.wrap` (one forward call per backward, as DDP needs).
Logged values are averaged over each log interval with one host sync per interval, then over ranks.

Randomness inside the step that takes no generator (dropout) draws from torch's global stream, which the loop
seeds before every iteration from (seed, iteration, rank): each rank draws its own dropout masks (the official
recipe seeds seed + rank), and iteration ``it`` draws the same ones whether the run is fresh or resumed. Stages
seed the initial weights with ``params.seed`` alone, so every rank starts from the same model.

Resume across world sizes: the world size is not part of the resume identity, so a run killed on 8 GPUs continues
on 4 (or 1) from its last checkpoint with the same global batch, lr schedule and data order (the step-indexed
batchers cut one global batch per iteration and give each rank its slice). It is then not bit-identical to an
uninterrupted run on one world size: whatever is drawn per rank (dropout masks, the views and noise streams the
batchers seed with the rank) is drawn in other slices, the gradient all-reduce sums in another order (float
rounding), and BatchNorm without SyncBatchNorm (MoCo's heads under gloo) normalises over per-rank batches of
another size.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import progress
from pipeline.core.runtime import autocast as runtime_autocast, uses_bf16
from pipeline.models.ema import EMA
from pipeline.core.rng import stream_seed
from pipeline.train.schedules import Schedule, set_lr
from pipeline.train.state import CurveLog, TrainState


Logs = Mapping[str, "torch.Tensor | float"]
StepFn = Callable[[Any, int], Logs]


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """AdamW groups over the trainable parameters: biases, 1-D tensors (norm scales, ...) and the names in ``skip``
    get no weight decay, the rest ``weight_decay`` (timm's add_weight_decay, the MAE/MAGE recipe)."""
    skip, decay, no_decay = set(skip), [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class TrainLoop:
    """One training run of stage ``name``: state ``paths.state/<name>.pt``, curves ``paths.plots/<name>.csv``.

    ``modules`` are everything that must survive a kill (models, optimizers, EMAs, anything with
    ``state_dict``/``load_state_dict``); ``optimizer`` and ``ema`` are added when not among them. They are restored
    here, so :attr:`start` (the iteration to resume at) and :attr:`extra` (what ``extra_state`` returned at the
    last checkpoint) are known before :meth:`run`. ``identity`` is the resume identity
    (pipeline.train.identity.resume_identity): without the world size, which may change between a kill and the
    resume. ``samples_per_step`` is the global number of samples per update, for ``samples_per_s``.
    ``optimizer`` is the loop's own (it backpropagates the step's loss); a step that owns several optimizers gets
    none and updates each through :meth:`update`. ``lr`` sets the lr of ``lr_optimizers`` (default: ``optimizer``)
    every iteration; ``grad_clip`` clips both kinds of update.
    """

    def __init__(self, name: str, params: Params, d: Dist, device: torch.device, *, steps: int, identity: dict,
                 modules: Mapping[str, Any], log_every: int, checkpoint_every: int, samples_per_step: int,
                 optimizer: torch.optim.Optimizer | None = None, lr: Schedule | None = None,
                 lr_optimizers: Sequence[torch.optim.Optimizer] = (), grad_clip: float | None = None,
                 accum: int = 1, ema: EMA | None = None, ema_model: nn.Module | None = None, bf16: bool = False):
        if (ema is None) != (ema_model is None):
            raise RcgError(f"{name}: the loop's EMA needs both ema and ema_model")
        if accum < 1 or (accum > 1 and optimizer is None):
            raise RcgError(f"{name}: gradient accumulation ({accum}) needs the loop's optimizer")
        self.name, self.d, self.device, self.steps, self.seed = name, d, device, steps, params.seed
        self.log_every, self.checkpoint_every, self.samples_per_step = log_every, checkpoint_every, samples_per_step
        self.optimizer, self.lr, self.grad_clip, self.accum = optimizer, lr, grad_clip, accum
        self.lr_optimizers = list(lr_optimizers) or ([optimizer] if optimizer is not None else [])
        self.ema, self.ema_model = ema, ema_model
        self.bf16 = uses_bf16(bf16, device)
        self.compile = params.runtime.compile
        self.curve_path = params.paths.plots / f"{name}.csv"
        self.modules = dict(modules)
        for key, obj in (("optimizer", optimizer), ("ema", ema)):
            if obj is not None and all(obj is not m for m in self.modules.values()):
                self.modules[key] = obj
        self.state = TrainState(params.paths.state / f"{name}.pt", identity)
        self.start, self.extra = self.state.load(self.modules)
        self.final: dict[str, float] = self.extra.get("final", {})  # the last logged figures
        self.curve: list[dict] = list(self.extra.get("curve", []))  # every logged row so far, {"step": s, ...}
        self._ddps: list[DistributedDataParallel] = []  # every module wrap() put under DDP

    @classmethod
    def from_section(cls, name: str, params: Params, section: Any, d: Dist, device: torch.device, *, steps: int,
                     identity: dict, modules: Mapping[str, Any], **options: Any) -> "TrainLoop":
        """The loop of a ``*.train`` params section, in one call: its ``log_every``, ``checkpoint_every``, global
        ``batch_size`` (the samples of a step) and, where the section has them, ``bf16``, ``grad_clip`` and
        ``accum_steps``; ``options`` give the rest (optimizer, lr, EMA, ...)."""
        fields = dict(log_every=section.log_every, checkpoint_every=section.checkpoint_every,
                      samples_per_step=section.batch_size)
        for key, field in (("bf16", "bf16"), ("grad_clip", "grad_clip"), ("accum", "accum_steps")):
            if hasattr(section, field):
                fields[key] = getattr(section, field)
        return cls(name, params, d, device, steps=steps, identity=identity, modules=modules, **fields, **options)

    # ------------------------------------------------------------------------------------------ helpers
    def wrap(self, model: nn.Module, *, compile: bool = True) -> nn.Module:
        """``model`` as the step should call it: DDP across ranks (world > 1), then ``torch.compile`` when
        ``runtime.compile`` is set and ``compile`` is true. Keep the bare model for the optimizer, the EMA and
        saving. A step may wrap several modules (a GAN's generator and discriminator); DDP averages each one's
        gradients in the backward that follows its forward call, so call each wrapped module once per backward
        (parameters used without a gradient, like a frozen discriminator in the generator's loss, are called
        bare)."""
        net = model
        if self.d.world > 1:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._ddps.append(net)
        return torch.compile(net) if self.compile and compile else net

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when asked and native on the device (:func:`pipeline.core.runtime.uses_bf16`)."""
        return runtime_autocast(self.bf16, self.device)

    def update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, *,
               clip: float | None | Literal["loop"] = "loop") -> torch.Tensor | None:
        """One update of ``optimizer`` from ``loss``, for a step function that owns several optimizers: zero its
        gradients, backpropagate ``loss`` (DDP averages the gradients of modules called through :meth:`wrap`),
        clip the gradient norm of its parameters to ``clip`` (``"loop"``: the loop's ``grad_clip``; ``None``: no
        clipping) and step. Returns the gradient norm before clipping (``None`` without clipping), for the logs.
        Call it outside :meth:`autocast`: the backward runs in the forward's precisions anyway."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self._clip_and_step(optimizer, self.grad_clip if clip == "loop" else clip)

    @staticmethod
    def _clip_and_step(optimizer: torch.optim.Optimizer, clip: float | None) -> torch.Tensor | None:
        """Clip the gradients of ``optimizer``'s parameters to norm ``clip`` (unless None), step; -> the norm."""
        norm = None
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
        optimizer.step()
        return norm

    def _backward_step(self, step_fn: StepFn, batch: Any, it: int) -> Logs:
        """The loop's own optimizer: ``accum`` micro-batches (DDP syncs on the last only), clipping, step, EMA."""
        micro = batch if self.accum > 1 else [batch]
        if len(micro) != self.accum:
            raise RcgError(f"{self.name}: iteration {it} brought {len(micro)} micro-batches, expected {self.accum}")
        self.optimizer.zero_grad(set_to_none=True)
        outs = []
        for j, mb in enumerate(micro):
            with contextlib.ExitStack() as sync:
                if j < len(micro) - 1:
                    for ddp in self._ddps:
                        sync.enter_context(ddp.no_sync())
                with self.autocast():
                    out = step_fn(mb, it)
                (out["loss"] / len(micro)).backward()
            outs.append(out)
        logs = {k: sum(_detach(o[k]) for o in outs) / len(outs) for k in outs[0]} if len(outs) > 1 else \
            {k: _detach(v) for k, v in outs[0].items()}
        norm = self._clip_and_step(self.optimizer, self.grad_clip)
        if norm is not None:
            logs["grad_norm"] = norm
        if self.ema is not None:
            self.ema.update(self.ema_model)
        return logs

    def _flush(self, carried: torch.Tensor, rows: list[torch.Tensor], keys: list[str],
               first_step: int) -> torch.Tensor:
        """The rank-averaged table of the logged rows since the last log (``carried``: those restored from the
        checkpoint, already averaged; ``rows``: this rank's since), with one host sync and one all-reduce, after
        naming the first non-finite loss. Also run at checkpoints between logs: no state is saved past a bad step."""
        table = torch.stack(rows)
        if self.d.world > 1:
            tdist.all_reduce(table)
            table /= self.d.world
        table = torch.cat([carried, table.cpu().double()])
        bad = (~torch.isfinite(table[:, keys.index("loss")])).nonzero()
        if len(bad):
            i = int(bad[0])
            raise RcgError(f"{self.name}: non-finite loss ({table[i, keys.index('loss')].item()}) at step "
                           f"{first_step + i}; training stopped, the last good state is kept in {self.state.path} "
                           "(lower the learning rate or check the inputs)")
        return table

    # ---------------------------------------------------------------------------------------------- run
    def run(self, step_fn: StepFn, batches: Iterable, on_log: Callable[[int, dict], dict] | None = None,
            extra_state: Callable[[], dict] | None = None) -> dict:
        """Train iterations :attr:`start` .. steps-1 and return the summary.

        ``batches`` yields one item per iteration from :attr:`start` on (with ``accum`` > 1, a sequence of
        ``accum`` micro-batches), e.g. a DataLoader over a step-indexed sampler. ``on_log(step, means)`` may add
        figures to each logged row (and reset the stage's own windows). ``extra_state()`` is saved with every
        checkpoint and comes back as :attr:`extra`. Summary: seconds, steps, resumed_from, samples_per_s,
        final_loss (``None`` until a first log).
        """
        # the logged rows since the last log, saved with each checkpoint so that curves resume exactly too
        keys: list[str] | None = self.extra.get("log_keys")
        carried: torch.Tensor | None = self.extra.get("log_rows")
        rows: list[torch.Tensor] = []
        # the curve file holds exactly the rows logged up to the resumed step, whatever happened to it meanwhile
        curve = CurveLog(self.curve_path, [k for k in self.curve[0] if k != "step"], self.curve) \
            if self.d.is_main and self.curve else None
        lr = float("nan")
        bar = progress(total=self.steps, desc=self.name, unit="step")
        bar.update(self.start)
        tic = time.perf_counter()
        done = self.start
        for it, batch in zip(range(self.start, self.steps), batches):
            torch.manual_seed(stream_seed(self.seed, "loop.dropout", it, self.d.rank))
            if self.lr is not None:
                lr = self.lr(it)
                for opt in self.lr_optimizers:
                    set_lr(opt, lr)
            logs = self._backward_step(step_fn, batch, it) if self.optimizer is not None else step_fn(batch, it)
            if keys is None:
                keys = list(logs)
                if "loss" not in keys:
                    raise RcgError(f"{self.name}: the step function must return a 'loss' (got {keys})")
            if carried is None:
                carried = torch.zeros(0, len(keys), dtype=torch.float64)
            rows.append(torch.stack([_scalar(logs[k], self.device) for k in keys]))
            done = step = it + 1
            bar.update(1)
            logging = step % self.log_every == 0 or step == self.steps
            saving = step % self.checkpoint_every == 0 or step == self.steps
            if not (logging or saving):
                continue
            table = self._flush(carried, rows, keys, step - len(carried) - len(rows) + 1)
            if logging:
                means = dict(zip(keys, table.mean(0).tolist()))
                carried, rows = carried[:0], []
                if on_log is not None:
                    means.update(on_log(step, means))
                if self.lr is not None:
                    means["lr"] = lr
                self.final = means
                bar.set_postfix(loss=f"{means['loss']:.4g}")
                self.curve.append({"step": step, **means})
                if self.d.is_main:
                    if curve is None:
                        curve = CurveLog(self.curve_path, list(means))
                    curve.add(step, **means)
            if saving and self.d.is_main:
                window = {"log_keys": keys, "log_rows": table} if not logging else {}
                self.state.save(step, self.modules, {"final": self.final, "curve": self.curve, **window,
                                                     **(extra_state() if extra_state else {})})
        bar.close()
        if done < self.steps:
            raise RcgError(f"{self.name}: the batches ran out at step {done} of {self.steps}")
        seconds = time.perf_counter() - tic
        trained = self.steps - self.start
        return {"steps": self.steps, "resumed_from": self.start, "seconds": round(seconds, 2),
                "samples_per_s": round(trained * self.samples_per_step / seconds, 1) if trained else None,
                "final_loss": round(self.final["loss"], 6) if "loss" in self.final else None}


def _detach(v: torch.Tensor | float) -> torch.Tensor | float:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _scalar(v: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A logged value as a 0-d float32 tensor on the training device (no host sync)."""
    if isinstance(v, torch.Tensor):
        return v.detach().reshape(()).float().to(device)
    return torch.tensor(float(v), dtype=torch.float32, device=device)
