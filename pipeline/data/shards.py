"""WebDataset shards: scan a folder, write ``{split}-NNNNNN.tar`` plus ``index.parquet``, read them back.

Shards are plain tars (one ``<key>.<jpg|png>`` and one ``<key>.cls`` member per image), readable by the
``webdataset`` package. The index records each image's byte offset inside its tar, so any stage can read
image ``idx`` with one seek instead of streaming: resumable, rank-split and random-access reads for free.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import RcgError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
INDEX_FILE, REJECTS_FILE, META_FILE = "index.parquet", "rejects.parquet", "meta.json"


def display_path(path: str) -> str:
    """File names may not be UTF-8; parquet needs text, so undecodable bytes are shown escaped."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def key_for(relpath: str) -> str:
    """Stable sample key from the source path: safe for tar and WebDataset (no dots, no slashes)."""
    return hashlib.sha256(os.fsencode(relpath)).hexdigest()[:24]


@dataclass(frozen=True)
class Candidate:
    path: str      # absolute path (may hold surrogate-escaped bytes)
    relpath: str   # relative to the dataset root
    label: int     # -1 for a flat folder


def _sorted_entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: os.fsencode(e.name))


def scan_folder(root: Path, labels: str = "auto"
                ) -> tuple[list[str], list[Candidate], list[tuple[str, str]], list[str]]:
    """Walk ``root`` deterministically. Returns (classes, candidates, rejects, warnings).

    With ``labels`` "auto" the layout follows torchvision's ImageFolder: subfolders are classes (index = sorted
    order) and their images may sit at any depth; a folder with no subfolders is flat and unlabelled. "folders"
    requires class subfolders; "none" walks every subfolder as a plain folder, unlabelled (data.labels). Every
    regular file found is either a candidate or a reject, so accepted + rejected = found holds downstream.
    """
    root = Path(root)
    if not root.is_dir():
        raise RcgError(f"not a folder: {root}")
    top = _sorted_entries(str(root))
    class_dirs = [e for e in top if e.is_dir() and not e.name.startswith(".")] if labels != "none" else []
    if labels == "folders" and not class_dirs:
        raise RcgError(f"{root}: data.labels is 'folders' but the folder has no class subfolders (data.labels: "
                       "auto or none for a folder without classes)")
    candidates: list[Candidate] = []
    rejects: list[tuple[str, str]] = []
    warnings: list[str] = []
    visited: set[tuple[int, int]] = set()

    def consider(entry: os.DirEntry, rel: str, label: int) -> None:
        try:
            st = os.stat(entry.path)  # follows symlinks
        except OSError as exc:
            reason = "symlink loop" if exc.errno == 40 else (
                "broken symlink" if entry.is_symlink() else f"unreadable: {exc.strerror}")
            rejects.append((rel, reason))
            return
        if stat.S_ISDIR(st.st_mode):
            walk(entry.path, rel, label, (st.st_dev, st.st_ino))
        elif not stat.S_ISREG(st.st_mode):
            rejects.append((rel, "not a regular file"))
        elif entry.name.startswith("."):
            rejects.append((rel, "hidden file"))
        elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            rejects.append((rel, "not an image file extension"))
        else:
            candidates.append(Candidate(entry.path, rel, label))

    def walk(path: str, rel: str, label: int, ident: tuple[int, int]) -> None:
        if ident in visited:
            rejects.append((rel, "symlink loop (folder already visited)"))
            return
        visited.add(ident)
        try:
            entries = _sorted_entries(path)
        except OSError as exc:
            rejects.append((rel, f"unreadable folder: {exc.strerror}"))
            return
        for entry in entries:
            consider(entry, f"{rel}/{entry.name}" if rel else entry.name, label)

    root_st = os.stat(root)
    if class_dirs:
        classes = [e.name for e in class_dirs]
        visited.add((root_st.st_dev, root_st.st_ino))
        for entry in top:
            if any(entry.name == c.name for c in class_dirs):
                continue
            if entry.is_dir():  # hidden folders are not classes
                rejects.append((entry.name, "hidden folder (not a class)"))
            else:
                rejects.append((entry.name, "file outside any class folder"))
        for label, entry in enumerate(class_dirs):
            before = len(candidates) + len(rejects)
            st = os.stat(entry.path)
            walk(entry.path, entry.name, label, (st.st_dev, st.st_ino))
            if len(candidates) + len(rejects) == before:
                warnings.append(f"empty class folder: {display_path(entry.name)} (label {label})")
    else:
        classes = []
        walk(str(root), "", -1, (root_st.st_dev, root_st.st_ino))
    return classes, candidates, rejects, warnings


def ustar_header(name: bytes, size: int) -> bytes:
    """A 512-byte USTAR header for a read-only regular file with mtime 0 (deterministic shards).

    tarfile's own header builder is ~50x slower; shard names are short ASCII, so a fixed template fits.
    """
    if len(name) > 99:
        raise ValueError(f"tar member name too long: {name!r}")
    h = bytearray(tarfile.BLOCKSIZE)
    h[0:len(name)] = name
    h[100:124] = b"0000444\x000000000\x000000000\x00"  # mode, uid, gid
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"                     # mtime
    h[148:156] = b" " * 8                               # checksum is computed over spaces here
    h[156:157] = b"0"                                   # regular file
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


class ShardWriter:
    """Appends samples to ``{prefix}-NNNNNN.tar`` files, starting a new one by count or size.

    Members are written directly (512-byte USTAR header, data, zero padding; two zero blocks and record
    padding at the end, as tarfile does), which keeps the per-image cost to two header encodes and lets
    the data offset of each image be known without re-reading.
    """

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shard_id, self.count, self.file = -1, 0, None

    @property
    def shard_name(self) -> str:
        return f"{self.prefix}-{self.shard_id:06d}.tar"

    def _member(self, name: str, data: bytes) -> int:
        self.file.write(ustar_header(name.encode(), len(data)))
        offset = self.file.tell()
        self.file.write(data)
        self.file.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        return offset

    def add(self, key: str, ext: str, data: bytes, label: int) -> tuple[str, int]:
        """Write one sample; return (shard file name, byte offset of the image data)."""
        if self.file is None or self.count >= self.max_count or self.file.tell() >= self.max_bytes:
            self.close()
            self.shard_id, self.count = self.shard_id + 1, 0
            self.file = open(self.out_dir / self.shard_name, "wb")
        offset = self._member(f"{key}.{ext}", data)
        if label >= 0:
            self._member(f"{key}.cls", str(label).encode())
        self.count += 1
        return self.shard_name, offset

    def close(self) -> None:
        if self.file is not None:
            self.file.write(b"\0" * (2 * tarfile.BLOCKSIZE))
            self.file.write(b"\0" * (-self.file.tell() % tarfile.RECORDSIZE))
            self.file.close()
            self.file = None


INDEX_SCHEMA = pa.schema([("split", pa.string()), ("idx", pa.int64()), ("key", pa.string()),
                          ("label", pa.int64()), ("shard", pa.string()), ("offset", pa.int64()),
                          ("nbytes", pa.int64()), ("ext", pa.string()), ("width", pa.int32()),
                          ("height", pa.int32()), ("sha256", pa.string()), ("source", pa.string())])
REJECTS_SCHEMA = pa.schema([("split", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def write_table(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    columns = {name: [r[name] for r in rows] for name in schema.names}
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)


class KeyColumn:
    """The sample keys of a split as one fixed-width bytes array (24 bytes a row for :func:`key_for` keys), not
    1.28M Python strings: ``keys[i]`` is the ``str`` key of row ``i``."""

    def __init__(self, keys: pa.Array):
        self._bytes = np.asarray(keys.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype=bytes)

    def __len__(self) -> int:
        return len(self._bytes)

    def __getitem__(self, idx: int) -> str:
        return self._bytes[idx].decode()


class ShardSet:
    """Random access to one split of a shard folder: ``len``, ``labels``, ``keys``, ``read(idx)``.

    The index is held as a few numpy columns (52 bytes a row: 67 MB at 1.28M images, against ~340 MB of Python
    objects), never as Python lists: a forked loader worker then shares these pages with its parent (no reference
    count is ever written into them) and a spawned one unpickles flat buffers. Only the columns a reader needs
    are read from the parquet file.
    """

    def __init__(self, shards_dir: str | Path, split: str = "train"):
        self.dir = Path(shards_dir)
        index_path = self.dir / INDEX_FILE
        if not index_path.is_file():
            raise RcgError(f"no shard index at {index_path}: run the shard stage first (rcg shard)")
        table = pq.read_table(index_path, columns=["key", "label", "shard", "offset", "nbytes"],
                              filters=[("split", "=", split)], read_dictionary=["shard"]).unify_dictionaries()
        if table.num_rows == 0:
            raise RcgError(f"{index_path} has no rows for split {split!r}")
        self.split = split
        self.keys = KeyColumn(table.column("key").combine_chunks())
        self.labels: np.ndarray = table.column("label").to_numpy().copy()  # int64 [N], writable (torch takes it)
        shard = table.column("shard").combine_chunks()  # dictionary-encoded: int32 codes + the few shard names
        self._shard_names: list[str] = shard.dictionary.to_pylist()
        self._shard = shard.indices.to_numpy().astype(np.int32)
        self._offset = table.column("offset").to_numpy()
        self._nbytes = table.column("nbytes").to_numpy()
        self._files: dict[str, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, idx: int) -> bytes:
        """The stored image bytes of row ``idx`` (one seek, one read)."""
        if os.getpid() != self._pid:  # forked loader worker: never share file offsets with the parent
            self._files, self._pid = {}, os.getpid()
        name = self._shard_names[self._shard[idx]]
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.dir / name, "rb")
        nbytes = int(self._nbytes[idx])
        f.seek(int(self._offset[idx]))
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise RcgError(f"shard {self.dir / name} is truncated at sample {idx} ({self.keys[idx]})")
        return data

    def __getstate__(self) -> dict:  # picklable for spawn-based loader workers
        return {**self.__dict__, "_files": {}}
