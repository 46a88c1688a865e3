"""The official VQGAN (MAGE's ``vqgan_jax_strongaug.ckpt``): its architecture read from a state dict and a strict
import into :class:`pipeline.models.vqgan.VQGAN`."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.artifacts import load_checkpoint
from pipeline.core.errors import RcgError
from pipeline.models.vqgan import VQGAN


def infer_vqgan_config(state_dict: dict) -> dict:
    """Constructor arguments of the VQGAN a state dict belongs to, read from its shapes (beta is not stored)."""
    sd = state_dict
    try:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        ch_mult = []
        while f"encoder.down.{len(ch_mult)}.block.0.conv1.weight" in sd:
            ch_mult.append(sd[f"encoder.down.{len(ch_mult)}.block.0.conv1.weight"].shape[0] // ch)
        num_res_blocks = 0
        while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in sd:
            num_res_blocks += 1
        z_channels = sd["encoder.conv_out.weight"].shape[0]
        n_embed, embed_dim = sd["quantize.embedding.weight"].shape
        out_ch = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as exc:
        raise RcgError(f"not a VQGAN state dict: key {exc} is missing") from exc
    if not ch_mult:
        raise RcgError("not a VQGAN state dict: no encoder.down.0.block.0.conv1.weight")
    return {"ch": int(ch), "ch_mult": tuple(int(m) for m in ch_mult), "num_res_blocks": num_res_blocks,
            "z_channels": int(z_channels), "embed_dim": int(embed_dim), "n_embed": int(n_embed),
            "in_channels": int(in_channels), "out_ch": int(out_ch)}


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def load_official_vqgan(path: str | Path, model: VQGAN | None = None) -> VQGAN:
    """Strictly load a VQGAN checkpoint (raw state dict, as released, or a ``{'state_dict': ...}`` wrapper).
    With ``model=None`` the architecture is inferred from the file, so a user only gives a path. Returns the model
    in eval mode, like every loader."""
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RcgError(f"{path} does not hold a VQGAN state dict (expected a dict of tensors)")
    if model is None:
        model = VQGAN(**infer_vqgan_config(sd))
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} file {list(sd[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} missing keys ({_first(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected keys ({_first(unexpected)})" if unexpected else "",
                    f"{len(shapes)} shape mismatches ({_first(shapes)})" if shapes else ""]
        raise RcgError(f"{path} does not fit the VQGAN architecture: " + "; ".join(p for p in problems if p))
    model.load_state_dict(sd, strict=True)
    return model.eval()
