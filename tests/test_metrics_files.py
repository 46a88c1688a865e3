"""Metrics files are what `dvc metrics show` / `dvc exp show` tabulate: flat keys, numbers, bools and short names.

The protocol of every figure is documented once, in docs/metrics.md, not repeated in the files.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import micro_params
from stages import encode, eval_tokenizer, pretrain_encoder, train_rdm, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_STR = 32


def problems(metrics: dict, prefix: str = "") -> list[str]:
    """What keeps a metrics dict from being one row of a table: lists, nulls, sentences. Nested dicts are
    columns ``a.b`` to dvc, so they are checked leaf by leaf."""
    bad = []
    for key, value in metrics.items():
        if isinstance(value, dict) and value:
            bad += problems(value, f"{prefix}{key}.")
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value == value):
            continue
        if isinstance(value, str) and len(value) <= MAX_STR:
            continue
        bad.append(f"{prefix}{key}: {type(value).__name__} {str(value)[:40]!r}")
    return bad


def test_the_check_refuses_what_a_table_cannot_show():
    assert problems({"fd": 0.4, "ratio": 1, "labelled": True, "source": "official"}) == []
    assert problems({"judge": {"fid": 1.5, "num_samples": 1000}}) == []
    for value in ({"steps": None}, [8, 8], None, float("nan"), "mean over 10 draws of 2000 store reps, vs the ref"):
        assert len(problems({"x": value})) == 1, value


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, micro_shards) -> Path:
    """The micro pipeline's metric-writing stages, in dvc.yaml order, once for this module."""
    import shutil
    root = tmp_path_factory.mktemp("metrics-run")
    shutil.copytree(micro_shards, root / "data" / "shards")
    params = micro_params(root, ["rdm.eval.num_samples=16"])
    for stage in (pretrain_encoder, encode, train_rdm, train_tokenizer, eval_tokenizer):
        stage.run(params)
    return root / "metrics"


def declared_metrics() -> list[str]:
    """The metrics files dvc.yaml declares, relative to the metrics folder."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = [next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])]
    return [re.sub(r"^\$\{paths\.metrics\}/", "", n) for n in names]


@pytest.mark.parametrize("name", ["encoder.json", "rdm.json", "tokenizer.json"])
def test_every_metrics_value_is_a_number_bool_or_short_name(micro_run, name):
    assert name in declared_metrics()
    metrics = json.loads((micro_run / name).read_text())
    assert metrics and problems(metrics) == []


def test_every_metric_key_is_documented(micro_run):
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for path in sorted(micro_run.glob("*.json")):
        missing = [k for k in json.loads(path.read_text()) if f"`{k}`" not in doc]
        assert not missing, f"{path.name}: not in docs/metrics.md: {missing}"
