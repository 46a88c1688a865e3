"""Shared fixtures: a micro preset (tiny models, 16x16 images) and one session-wide micro shard set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import Params, apply_override, deep_merge, validate
from pipeline.data.stores import StoreWriter

os.environ.setdefault("RCG_PROGRESS", "0")

# Modules that are integration tests from top to bottom (a real ``dvc repro``, SIGKILLed CLI runs, the GPU check's
# tiny run, the scale benchmark): every test in them is marked ``integration``. Single integration tests in other
# modules carry ``@pytest.mark.integration`` themselves. The unit tier is ``-m "not integration and not slow"``.
INTEGRATION_MODULES = {"test_dvc.py", "test_dvc_imported.py", "test_kill.py", "test_gpu_check.py",
                       "test_bench_scale.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)



@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Micro models gain nothing from intra-op threads, and on a busy machine they only wait for each other.
    Session-wide, so that module-scoped fixtures (a model trained once per module) compute exactly as the
    tests that compare against them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_after(monkeypatch, chunks: int) -> None:
    """Make the store chunk write after ``chunks`` completed ones die before it lands, like a kill mid-run."""
    real, count = StoreWriter.write, [0]

    def write(self, chunk, values):
        if count[0] == chunks:
            raise KeyboardInterrupt("simulated kill")
        count[0] += 1
        real(self, chunk, values)

    monkeypatch.setattr(StoreWriter, "write", write)


# Every stage at toy size: enough to exercise the real code paths in seconds on 2 CPU cores.
MICRO = {
    "data": {"builtin": {"num_train": 48, "num_val": 16, "image_size": 16}},
    "shard": {"max_per_shard": 20, "workers": 1},
    "views": {"count": 2, "resize": 16, "crop": 16},
    "encoder": {"model": {"arch": "vit", "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                          "proj_hidden_dim": 64, "proj_dim": 16},
                "train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1, "workers": 0, "checkpoint_every": 3}},
    "encode": {"batch_size": 8, "chunk_size": 16, "workers": 0, "knn_k": 5},
    "rdm": {"model": {"in_channels": 16, "time_embed_dim": 16, "model_channels": 32, "num_res_blocks": 2,
                      "num_classes": 10, "context_channels": 16},
            "train": {"steps": 20, "batch_size": 16, "warmup_steps": 0, "cosine": False, "checkpoint_every": 10,
                      "log_every": 5},
            "sample": {"steps": 10}, "eval": {"num_samples": 32, "batch_size": 16}},
    "tokenizer": {"model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8, "embed_dim": 8,
                            "n_embed": 32},
                  "train": {"steps": 6, "batch_size": 8, "disc_start": 3, "restart_every": 2,
                            "checkpoint_every": 3, "log_every": 2, "workers": 0},
                  "eval": {"num_images": 16, "batch_size": 8}},
    "tokenize": {"batch_size": 8, "chunk_size": 16, "workers": 0},
    "pixel": {"model": {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
                        "decoder_num_heads": 2},
              "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 2},
              "eval": {"num_images": 8, "batch_size": 4}, "cluster": {"k": 3, "iters": 10}},
    "judge": {"train": {"epochs": 2, "batch_size": 16}},
    "ssl_judge": {"model": {"width": 8, "stages": 2, "proj_hidden_dim": 32, "proj_dim": 16},
                  "train": {"epochs": 2, "batch_size": 16}},
    "sample": {"num_samples": 24, "batch_size": 12, "rdm": {"steps": 10},
               "figures": {"grid": 8, "columns": 4, "real_images": 2, "pairs": 1, "class_rows": 3, "cell": 16}},
    "score": {"num_reference_images": 0, "kid_subset_size": 20, "kid_subsets": 10, "isc_splits": 4,
              "min_samples": 20},
}


def micro_params(root: Path, overrides: list[str] = (), extra: dict | None = None) -> Params:
    """Micro preset with all artifacts under ``root``; ``overrides`` are ``key=value`` like ``--set``."""
    tree = deep_merge(MICRO, {"paths": {"data": str(root / "data"), "metrics": str(root / "metrics")}})
    tree = deep_merge(tree, extra or {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


@pytest.fixture(scope="session")
def micro_shards(tmp_path_factory) -> Path:
    """Shards of the micro built-in set, made once per session (copy before writing next to them)."""
    from stages import shard
    root = tmp_path_factory.mktemp("micro-shards")
    shard.run(micro_params(root))
    return root / "data" / "shards"


@pytest.fixture
def workspace(tmp_path: Path, micro_shards: Path) -> Path:
    """A fresh project root whose data/shards is a copy of the session's micro shards."""
    shutil.copytree(micro_shards, tmp_path / "data" / "shards")
    return tmp_path
