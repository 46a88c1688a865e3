"""``rcg info PATH``: a short summary of any artifact (shards, a Zarr store, a model file, a checkpoint)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.errors import RcgError
from pipeline.data.shards import INDEX_FILE, META_FILE, REJECTS_FILE


def _shards(path: Path) -> dict:
    index = pq.read_table(path / INDEX_FILE).to_pydict()
    rejects = pq.read_table(path / REJECTS_FILE).to_pydict() if (path / REJECTS_FILE).exists() else {"reason": []}
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    reasons = Counter(r.split(":")[0] for r in rejects["reason"])
    return {"kind": "shards", "path": str(path), "splits": meta.get("splits", dict(Counter(index["split"]))),
            "classes": len(meta.get("classes") or []), "images": len(index["key"]),
            "bytes": sum(index["nbytes"]), "shard_files": len(set(index["shard"])),
            "rejected": dict(reasons.most_common())}


def _store(path: Path) -> dict:
    import zarr

    from pipeline.data.stores import chunk_damage
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    arrays = {name: {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks)}
              for name, arr in group.arrays()}
    done = group["done"][:] if "done" in group else None
    damage = chunk_damage(path, attrs)
    out = {"kind": "zarr store", "path": str(path), "complete": bool(attrs.get("complete")) and damage is None,
           "arrays": arrays, "identity": attrs.get("identity")}
    if damage:
        out["damage"] = damage
    if done is not None:
        out["chunks_done"] = f"{int(done.sum())}/{len(done)}"
    return out


def _model(path: Path) -> dict:
    import argparse

    from pipeline.core.artifacts import is_model_file, load_checkpoint
    payload = load_checkpoint(path, safe_globals=(argparse.Namespace,))
    if is_model_file(payload) and "state_dict" in payload:
        sd = payload["state_dict"]
        return {"kind": "model file", "path": str(path), "format": payload["format"],
                "version": payload.get("version"), "parameters": sum(t.numel() for t in sd.values()),
                "tensors": len(sd), "has_ema": "ema_state_dict" in payload, "config": payload.get("config"),
                "summary": payload.get("summary")}
    top = list(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
    return {"kind": "checkpoint (not an rcg model file)", "path": str(path), "top_level": top}


def describe(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RcgError(f"no such file or folder: {path}")
    if path.is_dir() and (path / INDEX_FILE).exists():
        return _shards(path)
    if path.is_dir() and (path / "zarr.json").exists():
        return _store(path)
    if path.is_file() and (path.suffix in {".pt", ".pth", ".ckpt"} or path.name.endswith(".pth.tar")):
        return _model(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return {"kind": "parquet table", "path": str(path), "rows": table.num_rows, "columns": table.column_names}
    if path.suffix == ".tar":
        import tarfile
        with tarfile.open(path) as tar:
            names = tar.getnames()
        return {"kind": "tar shard", "path": str(path), "members": len(names),
                "samples": len({n.split(".")[0] for n in names})}
    raise RcgError(f"{path}: not an artifact rcg knows (shards folder, .zarr store, model file, parquet, tar)")
