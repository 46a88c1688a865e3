"""bench/scale.py at a tiny size, so that the ImageNet-size benchmark cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_bench_runs_and_both_loaders_draw_the_same_batches(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, "-m", "bench.scale", "--rows", "4200", "--views", "2", "--steps", "2",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by = {}
    for line in lines:
        by.setdefault(line["what"], []).append(line)
    assert by["build"][0]["rows"] == 4200 and set(by["decode"][0]["cache_gib"]) == {"reps", "tokens"}
    assert {x["layout"] for x in by["index"]} == {"columns", "lists"} and all(x["rows"] == 4200 for x in by["index"])
    loaders = {(x["loader"], x["layout"]): x for x in by["loader"]}
    assert set(loaders) == {("rdm", "mapped"), ("rdm", "memory"), ("pixel", "mapped"), ("pixel", "memory")}
    for kind, batch in (("rdm", 512), ("pixel", 4096)):  # the official global batches
        assert loaders[kind, "mapped"]["digest"] == loaders[kind, "memory"]["digest"]
        assert loaders[kind, "mapped"]["batch"] == batch and loaders[kind, "mapped"]["batches_per_s"] > 0
    assert [(x["rank"], x["world"], x["batch"]) for x in by["shared"]] == [(0, 2, 256), (1, 2, 256)]
    assert all(0 < x["pss"] <= x["rss"] for x in lines if "pss" in x)
