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
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

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
    if path.stat().st_size == 0:
        raise RcgError(f"cannot load checkpoint {path}: the file is empty (0 bytes), e.g. cut off by a full disk "
                       "or a killed copy; write it again")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RcgError(f"cannot load checkpoint {path}: {_refusal(exc)}") from exc
    except Exception as exc:  # torch raises several types for corrupt files, some with an empty message
        raise RcgError(f"cannot load checkpoint {path}: {_first_line(exc)} (the file is damaged or not a "
                       "PyTorch checkpoint)") from exc


def _first_line(exc: BaseException) -> str:
    """The exception's first non-empty line, or its type name when it has no message (torch's EOFError)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else f"{type(exc).__name__} (no message)"


def _refusal(exc: BaseException) -> str:
    """torch's weights-only refusal is a page of advice; keep the one sentence that says what was refused."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return (f"it holds an object of type {found.group(1)}, which weights_only loading refuses (only tensors, "
                "containers and allow-listed types are unpickled; the file was not loaded)")
    return f"weights_only loading refused it: {_first_line(exc)}"


def save_model_file(path: str | Path, fmt: str, config: dict, state_dict: dict,
                    ema_state_dict: dict | None = None, summary: dict | None = None) -> None:
    """Write a model file atomically (temp file + rename)."""
    import torch

    payload = {"format": fmt, "version": MODEL_FILE_VERSION, "config": config,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
               "summary": summary or {}}
    if ema_state_dict is not None:
        payload["ema_state_dict"] = {k: v.detach().cpu().contiguous() for k, v in ema_state_dict.items()}
    save_torch(payload, path)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically through a Python file, so a failed write (a full disk) surfaces as the OSError
    it is, named by :func:`atomic_file`, instead of torch's ``enforce fail ... unexpected pos``."""
    import torch

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def is_model_file(ckpt: Any) -> bool:
    """Whether a loaded checkpoint is one of our model files (:func:`save_model_file`) rather than an official
    checkpoint: the one ours-or-official test."""
    return isinstance(ckpt, dict) and "format" in ckpt


def load_model_file(path: str | Path, fmt: str) -> dict:
    """Read a model file written by :func:`save_model_file` and check it is the expected kind."""
    payload = load_checkpoint(path)
    if not is_model_file(payload):
        raise RcgError(f"{path} is not an rcg model file (no 'format' key); "
                       "official checkpoints are imported by the stage that owns them")
    if payload["format"] != fmt:
        raise RcgError(f"{path} holds a {payload['format']!r} model, expected {fmt!r}")
    if payload.get("version") != MODEL_FILE_VERSION:
        raise RcgError(f"{path} has model-file version {payload.get('version')}, "
                       f"this code reads version {MODEL_FILE_VERSION}")
    return payload


# ---------------------------------------------------------------------------------------------------
# The one way to load and save a model file: load_model(kind, path) / save_model(kind, path, ...)

@dataclass(frozen=True)
class ModelKind:
    """How one kind of model file becomes a model: the ``format`` its files carry and ``build(payload, path,
    **options)``, the model with the file's weights."""
    kind: str
    fmt: str
    build: Callable[..., Any]


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model_kind(kind: str, fmt: str, build: Callable[..., Any]) -> None:
    """Called once by each model's own module (``pipeline.models.<module>``), so code that loads a kind imports
    that module, and DVC's deps (the import closure) see it."""
    MODEL_KINDS[kind] = ModelKind(kind, fmt, build)


def _model_kind(kind: str) -> ModelKind:
    if kind not in MODEL_KINDS:
        raise RcgError(f"no model kind {kind!r} is registered: import its module from pipeline.models first "
                       f"(registered: {', '.join(sorted(MODEL_KINDS)) or 'none'})")
    return MODEL_KINDS[kind]


def load_model(kind: str, path: str | Path, **options: Any) -> tuple[Any, dict]:
    """(the model in eval mode, the file's payload) of a ``kind`` model file (``encoder``, ``tokenizer``, ``rdm``,
    ``pixel``, ``judge``, ``ssl_judge``: the names of ``Paths.model_file``); ``options`` go to the kind's build
    (``use_ema`` for ``rdm`` and ``pixel``). Official checkpoints are read by ``pipeline.models`` importers."""
    spec = _model_kind(kind)
    payload = load_model_file(path, spec.fmt)
    return spec.build(payload, path, **options).eval(), payload


def save_model(kind: str, path: str | Path, config: dict, state_dict: dict, ema_state_dict: dict | None = None,
               summary: dict | None = None) -> None:
    """Write a ``kind`` model file atomically (what :func:`load_model` reads back)."""
    save_model_file(path, _model_kind(kind).fmt, config, state_dict, ema_state_dict, summary)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with _naming_write_errors(path, tmp):
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
        with _naming_write_errors(path, tmp):
            yield tmp
            replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def _naming_write_errors(path: Path, tmp: Path) -> Iterator[None]:
    """An OSError while writing ``tmp`` (ENOSPC, EIO, EROFS carry no file name) becomes one line naming the
    output ``path``; errors about other files keep their own names."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(str(tmp)):
            raise
        raise RcgError(f"cannot write {path}: {exc.strerror or exc} (nothing was replaced; "
                       "free space or fix the folder, then rerun)") from exc


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` onto ``dst``, all or nothing: a previous ``dst`` is set aside, and put back when the
    second rename fails, so a finished output is never lost (it is removed only after the swap)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
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
