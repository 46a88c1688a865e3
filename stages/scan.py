"""Stage ``scan``: the image folders -> ``data/folder_listing.json`` (names, sizes, mtimes; never the bytes).

DVC runs it on every ``dvc repro`` (``always_changed``); ``shard`` depends on its file, so a folder whose
contents changed reshards and an untouched one does not (pipeline.data.listing).
"""

from __future__ import annotations

import time

from pipeline.core.artifacts import write_json
from pipeline.core.config import Params
from pipeline.data.listing import folder_listing

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["data"]


def run(params: Params) -> dict:
    start = time.perf_counter()
    listing = folder_listing(params.data)
    write_json(params.paths.listing, listing)
    return {"output": str(params.paths.listing), "seconds": round(time.perf_counter() - start, 2),
            **{split: {k: v for k, v in f.items() if k != "path"} for split, f in listing["folders"].items()}}
