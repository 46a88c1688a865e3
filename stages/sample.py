"""Stage ``sample@<setting>``: RCG's two passes for one generation setting -> ``data/samples/<setting>.zarr`` and
PNG figures under ``metrics/figures/<setting>/`` (listed in the summary).

Reads ``data/models/pixel-<generator>.pt``, ``tokenizer.pt``, ``rdm.pt`` (RDM reps only), ``data/reps.zarr``
(oracle reps and the figures' real reps) and the shards (the figures' real images). :func:`run_files` is the
offline mode of ``rcg sample``: the same on model files given by path (ours or official), outside the DVC graph,
into a folder of the caller's choice. Chunked, resumable, rank-split (:mod:`pipeline.gen.sampling`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import distributed
from pipeline.core.config import Params, Sample, SampleSetting
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.gen.sampling import Files, fill_samples, sampler_summary

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["sample.settings.{item}", "sample.num_samples", "sample.batch_size", "sample.seed", "sample.rdm",
          "sample.bf16", "sample.figures"]


def _setting(params: Sample, name: str) -> SampleSetting:
    if name not in params.settings:
        raise RcgError(f"unknown sample setting {name!r} (sample.settings has: {', '.join(params.settings)})")
    return params.settings[name]


def dvc_files(params: Params, name: str) -> Files:
    setting = _setting(params.sample, name)
    paths = params.paths
    files = Files(paths.model_file("pixel", setting.generator), paths.model_file("tokenizer"),
                  paths.model_file("rdm") if setting.reps == "rdm" else None, params.paths.reps, params.paths.shards,
                  params.paths.data / "samples" / f"{name}.zarr", params.paths.metrics / "figures" / name)
    for path, stage in ((files.pixel, f"train-pixel {setting.generator}"), (files.tokenizer, "train-tokenizer"),
                        (files.rdm, "train-rdm")):
        if path is not None and not path.is_file():
            raise RcgError(f"no model at {path}: run `rcg {stage}` first")
    return files


def run(params: Params, item: str) -> dict:
    """``rcg sample SETTING``: the DVC stage instance ``sample@SETTING``."""
    d = distributed.init(params.runtime)
    setting = _setting(params.sample, item)
    files = dvc_files(params, item)
    log(f"sample {item}: {sampler_summary(setting, params.sample)} (from the params' sample section)")
    return fill_samples(item, setting, params.sample, files, device_for(params.runtime, d.local_rank), d)


def run_files(params: Params, item: str, out: Path, pixel: Path, tokenizer: Path, rdm: Path | None = None,
              reps: Path | None = None, shards: Path | None = None, params_source: str = "the params") -> dict:
    """Offline ``rcg sample SETTING --out DIR --pixel FILE --tokenizer FILE [--rdm FILE] [--reps STORE]
    [--shards DIR]``: any model files (ours or official), outside the DVC graph, into ``DIR/<setting>.zarr`` and
    ``DIR/figures/<setting>/``; the setting, the sampler and the counts come from the params as in the stage
    (``params_source`` says where they came from, in the log line that gives them). Reads only the files given:
    the paths in the params are not used."""
    d = distributed.init(params.runtime)
    setting = _setting(params.sample, item)
    for path, flag in ((pixel, "--pixel"), (tokenizer, "--tokenizer"), (rdm, "--rdm"), (reps, "--reps"),
                       (shards, "--shards")):
        if path is not None and not Path(path).exists():
            raise RcgError(f"{flag}: not found: {path}")
    if setting.reps == "rdm" and rdm is None:
        raise RcgError(f"setting {item!r} samples RDM reps: give --rdm FILE")
    if setting.reps == "stored" and reps is None:
        raise RcgError(f"setting {item!r} conditions on stored reps: give --reps STORE")
    log(f"sample {item}: {sampler_summary(setting, params.sample)} (from {params_source})")
    files = Files(Path(pixel), Path(tokenizer), Path(rdm) if rdm is not None and setting.reps == "rdm" else None,
                  reps, shards, Path(out) / f"{item}.zarr", Path(out) / "figures" / item)
    return fill_samples(item, setting, params.sample, files, device_for(params.runtime, d.local_rank), d)
