"""The resume identity of a training run, derived in one place for every stage.

A saved training state is reused only when the run that wrote it would compute the same result: the same
what-to-compute params (every key under the sections the stage names, minus the fields the schema marks
``how_to_run``: workers, cadences, threads, the runtime section) and the same input content (the shard index hash,
the stores' identities, upstream model-file hashes). A change of any of them starts training over; a change of how
to run resumes, and so does a change of the number of ranks (pipeline.train.loop says what is then not
bit-identical).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pipeline.core.artifacts import file_sha256
from pipeline.core.config import Params, what_to_compute
from pipeline.data.shards import INDEX_FILE


def resume_identity(params: Params, keys: Sequence[str], **inputs: Any) -> dict:
    """``{"params": {leaf key: value}, "inputs": inputs}`` for the dotted ``keys`` (sections or leaves, e.g.
    ``["seed", "views.crop", "tokenizer.model", "tokenizer.train"]``). ``inputs`` are JSON-able identities of what
    the run reads: :func:`shards_identity`, a store's ``identity`` attribute, a model file's ``file_sha256``."""
    tree = params.model_dump(mode="json")
    values = {leaf: _at(tree, leaf) for key in keys for leaf in what_to_compute(key)}
    return {"params": values, "inputs": inputs}


def _at(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def shards_identity(shards_dir: Path) -> str:
    """The content of a shard set: the hash of its index, which holds every image's content hash."""
    return file_sha256(Path(shards_dir) / INDEX_FILE)
