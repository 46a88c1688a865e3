"""Official RCG RDM checkpoints (docs/official.md §2.5): the state-dict conversion, the file as a model with its
EMA (:func:`official_rdm`, no store needed) and train_rdm's checked import (:func:`load_official_rdm_model`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.core.artifacts import file_sha256, load_checkpoint
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.models.ema import EMA
from pipeline.models.official.mocov3 import check_official_encoder
from pipeline.models.diffusion import OFFICIAL_SCHEDULE, ldm_betas
from pipeline.models.rdm import RDM


NET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
COND_PREFIX = "cond_stage_model."
IGNORED_PREFIXES = ("pretrained_encoder.",)
IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}


def ema_shadow_name(param_name: str) -> str:
    """LitEma's buffer name for a SimpleMLP param: 'diffusion_model.' + name with every dot removed."""
    return EMA_PREFIX + ("diffusion_model." + param_name).replace(".", "")


def _few(keys: list[str], n: int = 5) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise RcgError(f"official RDM checkpoint lacks {key!r}; cannot infer the architecture")
    return tuple(sd[key].shape)


def _check_state(what: str, state: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> None:
    """RcgError naming missing/unexpected keys and shape mismatches (counts and the first few)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"missing {_few(missing)}"] if missing else []) + \
               ([f"unexpected {_few(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch {_few(wrong, 3)}"] if wrong else [])
    if problems:
        raise RcgError(f"official RDM checkpoint: {what} does not fit the inferred SimpleMLP: " + "; ".join(problems))


def convert_official_rdm(sd: Mapping[str, Any]) -> tuple[dict, dict, dict | None, dict]:
    """Split an official RDM state dict into (RDM config, net state, EMA net state or None, cond state).

    Works on anything with ``.shape`` (meta tensors included) except the stored ``betas``, which must be
    real values: they are checked against our schedule.
    """
    if not any(k.startswith(NET_PREFIX) for k in sd):
        raise RcgError(f"not an official RDM checkpoint: no '{NET_PREFIX}*' keys "
                       f"(first keys: {', '.join(list(sd)[:5])})")
    net = {k[len(NET_PREFIX):]: v for k, v in sd.items() if k.startswith(NET_PREFIX)}
    shadows = {k: v for k, v in sd.items() if k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS}
    cond = {k[len(COND_PREFIX):]: v for k, v in sd.items() if k.startswith(COND_PREFIX)}
    other = [k for k in sd if not k.startswith((NET_PREFIX, EMA_PREFIX, COND_PREFIX) + IGNORED_PREFIXES)
             and k not in IGNORED_KEYS]
    if other:
        raise RcgError(f"official RDM checkpoint has unexpected keys {_few(other)}")
    if "betas" in sd:
        ours = torch.tensor(ldm_betas(**OFFICIAL_SCHEDULE), dtype=torch.float32)
        if tuple(sd["betas"].shape) != tuple(ours.shape) or not torch.allclose(sd["betas"].float(), ours, rtol=1e-4):
            raise RcgError("official RDM checkpoint's 'betas' differ from our schedule "
                           "(T=1000, sqrt-linear 0.0015..0.0195)")

    blocks = {int(m.group(1)) for k in net if (m := re.match(r"res_blocks\.(\d+)\.", k))}
    class_cond = any(".context_layers." in k for k in net)
    n_classes, embed_dim = _shape(cond, "embedding.weight")
    config = dict(class_cond=class_cond, n_classes=n_classes,
                  in_channels=_shape(net, "input_proj.weight")[1],
                  time_embed_dim=_shape(net, "time_embed.0.weight")[0],
                  model_channels=_shape(net, "input_proj.weight")[0],
                  bottleneck_channels=_shape(net, "res_blocks.0.in_layers.2.weight")[0],
                  out_channels=_shape(net, "out.2.weight")[0],
                  num_res_blocks=max(blocks) + 1 if blocks else 0, embed_dim=embed_dim)
    if not class_cond and n_classes != 1:
        raise RcgError(f"official RDM checkpoint: unconditional MLP but {n_classes} class embeddings")
    with torch.device("meta"):
        ref = RDM(**config)
    _check_state("model.diffusion_model.*", net, ref.net.state_dict())
    _check_state("cond_stage_model.*", cond, ref.cond_stage_model.state_dict())

    ema = None
    if shadows:
        names = {ema_shadow_name(n): n for n, _ in ref.net.named_parameters()}
        unexpected = [k for k in shadows if k not in names]
        if unexpected:
            raise RcgError(f"official RDM checkpoint: unexpected EMA shadows {_few(unexpected)}")
        ema = {names[k]: v for k, v in shadows.items()}
        _check_state("model_ema.*", ema, dict(ref.net.named_parameters()))
    return config, net, ema, cond


def read_official_rdm(path: str | Path) -> Mapping[str, Any]:
    """The state dict inside an official RCG RDM checkpoint (``{'model' or 'state_dict': ..., 'args':
    Namespace, ...}``), loaded with weights_only=True and only ``argparse.Namespace`` allow-listed."""
    ckpt = load_checkpoint(path, safe_globals=(argparse.Namespace,))
    if not isinstance(ckpt, dict):
        raise RcgError(f"{path} is not an official RDM checkpoint (holds a {type(ckpt).__name__})")
    sd = ckpt.get("model", ckpt.get("state_dict"))
    if not isinstance(sd, Mapping):
        raise RcgError(f"{path} is not an official RDM checkpoint: no 'model' or 'state_dict' entry "
                       f"(top-level keys: {', '.join(map(str, list(ckpt)[:8]))})")
    return sd


def load_official_rdm(path: str | Path, sd: Mapping[str, Any] | None = None) -> tuple[dict, dict, dict | None, dict]:
    """Read an official RCG RDM checkpoint (or convert its already-read state dict ``sd``).

    Returns (config for ``RDM(**config)``, net state, EMA net state or None, cond-embedder state).
    The frozen encoder and the schedule buffers are dropped (the stored betas are checked).
    """
    try:
        return convert_official_rdm(read_official_rdm(path) if sd is None else sd)
    except RcgError as exc:
        raise RcgError(f"{path}: {exc}") from None


def official_rdm_encoder(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The MoCo v3 encoder an official RDM embeds (``pretrained_encoder.*``: the weights it was trained on),
    with MoCoViT key names; empty if the file does not carry it."""
    prefix = IGNORED_PREFIXES[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def official_rdm(path: str | Path, device: torch.device | str = "cpu",
                 sd: Mapping[str, Any] | None = None) -> tuple[RDM, EMA | None, dict, Mapping[str, Any]]:
    """An official RCG RDM file as a model, with nothing else to check against: (RDM on ``device`` in eval mode
    with the file's raw weights, its EMA or None, ``RDM(**config)``'s config, the file's state dict). RCG samples
    with the EMA: ``ema.copy_to(model.net)``. The one place an official RDM becomes a model."""
    sd = read_official_rdm(path) if sd is None else sd
    config, net_sd, ema_sd, cond_sd = load_official_rdm(path, sd)
    model = RDM(**config)
    model.net.load_state_dict(net_sd)
    model.cond_stage_model.load_state_dict(cond_sd)
    model.to(device)
    ema = None
    if ema_sd is not None:
        ema = EMA(model.net)  # evaluated, never updated: the decay does not matter
        ema.load_state_dict(ema_sd)
    return model.eval(), ema, config, sd


def load_official_rdm_model(path: Path, ours: dict, whiten_power: float, schedule: Mapping[str, Any],
                            store_identity: dict, store_name: str,
                            device: torch.device) -> tuple[RDM, EMA | None, dict, dict]:
    """An official RCG RDM file as a ready model: (RDM on ``device``, its EMA or None, ``RDM(**config)``'s
    config, a summary naming the file and the encoder check), after checking that it fits ``ours`` (the
    ``RDM(**kwargs)`` of ``rdm.model``: :func:`rdm_kwargs`) with ``whiten_power`` 0, that ``schedule`` (the
    ``rdm.diffusion`` fields) is the official one and that it was trained on the encoder the store
    (``store_identity``) was made with."""
    sd = read_official_rdm(path)
    config = load_official_rdm(path, sd)[0]
    diffs = [f"{k} {ours[k]} (file: {config[k]})" for k in config if ours[k] != config[k]]
    if whiten_power:
        diffs.append(f"whiten_power {whiten_power} (official RDMs run on the raw reps: 0)")
    if diffs:
        raise RcgError(f"rdm.checkpoint {path} does not match rdm.model: {', '.join(diffs)}")
    if dict(schedule) != OFFICIAL_SCHEDULE:  # load_official_rdm checked the file's betas against this schedule
        raise RcgError(f"rdm.checkpoint {path} uses the official schedule (T=1000, 0.0015..0.0195); "
                       "rdm.diffusion must keep its defaults")
    encoder_check = check_official_encoder(official_rdm_encoder(sd), store_identity, store_name, path)
    model, ema, config, _ = official_rdm(path, device, sd)
    if ema is None:
        log(f"warning: {path} has no EMA weights; evaluating its raw weights")
    return model, ema, config, {"source": "official", "checkpoint": str(path), "sha256": file_sha256(path),
                                "encoder_check": encoder_check}


