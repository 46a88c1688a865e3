"""The image folders' listing: what DVC hashes in place of a user's folder, so that ``shard`` reruns when it changes.

``data.folder`` and ``data.val_folder`` are params (paths anywhere, often outside the repository), so DVC sees
their names and not their contents. Stage ``scan`` runs on every ``dvc repro`` (``always_changed``) and writes
this listing; ``shard`` depends on the file, so it reruns exactly when an entry was added, removed, renamed,
resized or rewritten (its mtime moved), and not otherwise. Every entry the shard stage's walk can meet counts
(non-images and unreadable entries end up in ``rejects.parquet``); symlinks are followed as the walk follows
them. Only names and ``stat`` figures are read, never the bytes: about a second per 100k files on a local disk.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from pipeline.core.config import Data
from pipeline.core.errors import require_dir

FORMAT = "rcg-folder-listing"


def folder_fingerprint(root: Path) -> dict:
    """``{"path", "entries", "files", "bytes", "sha256"}`` of every entry below ``root`` (sorted, recursive):
    the sha256 runs over one line per entry, its relative path with its size and mtime (ns), or why it could not
    be read."""
    digest, counts, visited = hashlib.sha256(), {"entries": 0, "files": 0, "bytes": 0}, set()

    def add(line: bytes) -> None:
        digest.update(line + b"\n")
        counts["entries"] += 1

    def walk(path: str, rel: bytes) -> None:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in visited:
            add(rel + b"\tloop")
            return
        visited.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            add(rel + b"\tunreadable folder " + str(exc.errno).encode())
            return
        for entry in entries:
            name = rel + b"/" + os.fsencode(entry.name) if rel else os.fsencode(entry.name)
            try:
                st = os.stat(entry.path)  # follows symlinks, as the shard stage's walk does
            except OSError as exc:
                add(name + b"\terror " + str(exc.errno).encode())
                continue
            if stat.S_ISDIR(st.st_mode):
                add(name + b"/")
                walk(entry.path, name)
            else:
                add(b"%s\t%d\t%d\t%o" % (name, st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode)))
                counts["files"] += 1
                counts["bytes"] += st.st_size

    walk(str(root), b"")
    return {"path": str(root), **counts, "sha256": digest.hexdigest()}


def folder_listing(data: Data) -> dict:
    """The listing of ``data``'s folders (``{"train": ..., "val": ...}``; none for the built-in set, whose
    images are a function of ``data.builtin``, a param)."""
    folders = {}
    if data.source == "folder":
        for split, folder, key in (("train", data.folder, "data.folder"), ("val", data.val_folder, "data.val_folder")):
            if folder is not None:
                require_dir(folder, key)
                folders[split] = folder_fingerprint(Path(folder))
    return {"format": FORMAT, "version": 1, "source": data.source, "folders": folders}
