"""Model files, safe checkpoint loading, content hashes and atomic writes.

Every model this project writes is a plain dict loadable with ``torch.load(weights_only=True)``:
``{"format", "version", "config", "state_dict", "ema_state_dict"?, "summary"}``. Nothing is ever
unpickled beyond tensors, containers and an explicit allow-list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from pipeline.core.errors import RcgError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's light paths never load it
    import torch

MODEL_FILE_VERSION = 1


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """Content hash of a file: the identity of a model or an index in every store's attributes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, safe_globals: tuple = ()) -> Any:
    """Load any checkpoint with ``weights_only=True``; ``safe_globals`` allow-lists extra types
    (e.g. ``argparse.Namespace`` in the official RCG files). A missing or unreadable file raises RcgError."""
    import torch  # imported here so torch-free stages (shard, info on shards) start fast

    path = Path(path)
    if not path.is_file():
        raise RcgError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise RcgError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from exc


def save_model_file(path: str | Path, fmt: str, config: dict, state_dict: dict,
                    ema_state_dict: dict | None = None, summary: dict | None = None) -> None:
    """Write a model file atomically (temp file + rename)."""
    import torch

    payload = {"format": fmt, "version": MODEL_FILE_VERSION, "config": config,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
               "summary": summary or {}}
    if ema_state_dict is not None:
        payload["ema_state_dict"] = {k: v.detach().cpu().contiguous() for k, v in ema_state_dict.items()}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_model_file(path: str | Path, fmt: str) -> dict:
    """Read a model file written by :func:`save_model_file` and check it is the expected kind."""
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or "format" not in payload:
        raise RcgError(f"{path} is not an rcg model file (no 'format' key); "
                       "official checkpoints are imported by the stage that owns them")
    if payload["format"] != fmt:
        raise RcgError(f"{path} holds a {payload['format']!r} model, expected {fmt!r}")
    if payload.get("version") != MODEL_FILE_VERSION:
        raise RcgError(f"{path} has model-file version {payload.get('version')}, "
                       f"this code reads version {MODEL_FILE_VERSION}")
    return payload


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder; swap it in place of ``path`` only on success,
    so a killed run never leaves a half-written output where a finished one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` onto ``dst``, replacing any previous ``dst`` (old one removed after the swap)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic, stable (sorted, indented) JSON for metrics and run records."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, values): equal weights, equal hash, whatever
    file or container they came in."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
