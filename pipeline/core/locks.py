"""One run at a time per output: a stage locks every file or folder it writes before any work.

Two ``rcg encode`` on the same data folder would otherwise race on ``reps.zarr.partial`` and its rename. Each
output gets a hidden sibling ``.<name>.lock`` holding the writer's pid under ``flock``: the kernel drops the
lock when its process dies, so a killed run never leaves a stale lock, and a second run stops at once with one
line naming the holder. Creating the lock files is also the check that every output's folder is writable,
done before the work rather than after it. (``dvc repro`` holds its own repository lock; ``rcg`` needs these.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from pipeline.core.errors import RcgError

if TYPE_CHECKING:
    from pipeline.core.config import Paths

# Every stage's outputs (dvc.yaml's outs, metrics and plots; tests/test_integrity.py checks they agree).
STAGE_OUTPUTS: dict[str, Callable[["Paths", str | None], list[Path]]] = {
    "scan": lambda p, item: [p.listing],
    "shard": lambda p, item: [p.shards],
    "pretrain_encoder": lambda p, item: [p.model_file("encoder"), p.plots / "pretrain_encoder.csv"],
    "encode": lambda p, item: [p.reps, p.metrics / "encoder.json"],
    "train_rdm": lambda p, item: [p.model_file("rdm"), p.metrics / "rdm.json", p.plots / "train_rdm.csv"],
    "train_tokenizer": lambda p, item: [p.model_file("tokenizer"), p.plots / "train_tokenizer.csv"],
    "eval_tokenizer": lambda p, item: [p.metrics / "tokenizer.json", p.metrics / "figures" / "tokenizer"],
    "tokenize": lambda p, item: [p.tokens],
    "train_pixel": lambda p, item: [p.model_file("pixel", item), p.metrics / f"pixel-{item}.json",
                                    p.plots / f"train_pixel-{item}.csv"],
    "train_judge": lambda p, item: [p.model_file("judge"), p.metrics / "judge.json", p.plots / "train_judge.csv"],
    "train_ssl_judge": lambda p, item: [p.model_file("ssl_judge"), p.metrics / "ssl_judge.json",
                                        p.plots / "train_ssl_judge.csv"],
    "reference": lambda p, item: [p.data / "reference" / f"{item}.npz", p.data / "reference" / f"{item}.json"],
    "sample": lambda p, item: [p.data / "samples" / f"{item}.zarr", p.metrics / "figures" / f"{item}"],
    "score": lambda p, item: [p.metrics / "score" / f"{item}.json"],
    "score_real": lambda p, item: [p.metrics / "score" / "real.json"],  # `rcg score real` (score@real's own stage)
    "compare": lambda p, item: [p.metrics / "compare.md", p.metrics / "compare.json"],
}


def stage_outputs(stage: str, paths: "Paths", item: str | None = None) -> list[Path]:
    """The files and folders ``stage`` (``stage@item``) writes."""
    return STAGE_OUTPUTS[stage](paths, item)


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "unknown pid (it is starting)"


def _acquire(output: Path, command: str) -> int:
    """Lock ``output``; return the descriptor. RcgError when its folder is not writable or another run holds it."""
    lock = lock_path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RcgError(f"{output} is being written by another run (pid {holder}); wait for it to finish "
                               f"or stop it (lock: {lock})") from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}, rcg {command}\n".encode())
        return fd
    except OSError as exc:
        raise RcgError(f"cannot write {output}: its folder {output.parent} is not writable "
                       f"({exc.strerror or exc}); nothing was done") from exc


def _release(output: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(output))  # removed while still held, so no other run can lock a file about to vanish
    os.close(fd)


@contextlib.contextmanager
def locked_outputs(outputs: Sequence[Path], command: str) -> Iterator[None]:
    """Hold a lock on every output for the duration of the block (taken in sorted order: of two runs started
    together, one gets them all and the other stops, never both). Under torchrun only global rank 0 locks: the ranks of one run write together."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    held: list[tuple[Path, int]] = []
    try:
        for output in sorted({Path(o) for o in outputs}):
            held.append((output, _acquire(output, command)))
        yield
    finally:
        for output, fd in reversed(held):
            _release(output, fd)
