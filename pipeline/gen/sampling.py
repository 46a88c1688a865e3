"""Filling one setting's sample store and drawing its figures: what the ``sample`` stage (and its offline mode)
runs, given where to read and write.

The store is filled chunk by chunk (one chunk = one batch = one seeded stream, see :mod:`pipeline.gen.rcg`), so a
killed run resumes and ranks that take disjoint chunk ranges write exactly what one process does. Then the main
rank draws the figures: the sample grid; for rep generators the paper's Figure 6 (a real image's stored rep
decoded into a row) and Figure 7 (interpolated reps of two real images) and editing examples; for label
settings one row per class or cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image

from pipeline.core.artifacts import atomic_dir
from pipeline.core.config import Sample, SampleSetting
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import log, progress
from pipeline.core.runtime import uses_bf16
from pipeline.data.images import decode_rgb
from pipeline.data.sample_store import SampleWriter, open_samples
from pipeline.data.shards import ShardSet
from pipeline.data.stores import open_store
from pipeline.data.views import ViewRecipe, make_view
from pipeline.gen import figures as fig
from pipeline.gen.editing import edit, shown_masked
from pipeline.gen.rcg import (Models, chunk_generator, check_setting, figure_generator, generate,
                              interpolation_rows, label_ids, label_rows, load_models, oracle_rows,
                              rep_rows, sample_labels)


@dataclass
class Files:
    """Where one run reads and writes (the DVC layout, or paths given to the offline mode)."""
    pixel: Path
    tokenizer: Path
    rdm: Path | None
    reps: Path | None     # reps store: oracle reps, and the figures' real reps
    shards: Path | None   # the figures' real images
    store: Path           # <setting>.zarr
    figures: Path         # folder of the setting's PNGs


@dataclass
class StoredReps:
    """A reps store as sampling reads it: the array [N, V, D] and what the compatibility check compares."""
    array: zarr.Array
    dim: int
    encoder: str | None  # weights_sha256 of the encoder that made them

    @property
    def identity(self) -> dict:
        return {"dim": self.dim, "encoder": self.encoder}


def open_stored_reps(path: Path | None) -> StoredReps | None:
    """The reps store at ``path``; None when there is none (then no oracle setting and no real-image figures)."""
    if path is None or not Path(path).exists():
        return None
    group = open_store(Path(path), "reps")
    identity = group.attrs.asdict().get("identity", {})
    return StoredReps(group["reps"], group["reps"].shape[-1], (identity.get("encoder") or {}).get("weights_sha256"))


def sampler_summary(setting: SampleSetting, cfg: Sample) -> str:
    """The settings that decide what a run draws, in one line for the log (the default run's sampler and RCG's
    official one differ: 10 vs 20 decoding steps, RDM DDIM 100 steps at eta 0 vs 250 at eta 1)."""
    rdm = cfg.rdm
    return (f"MAGE {setting.iterations} decoding steps at temperature {setting.temperature:g}, guidance "
            f"{setting.guidance:g}" + (f"; RDM DDIM {rdm.steps} steps, eta {rdm.eta:g}, temperature "
                                       f"{rdm.temperature:g}" if setting.reps == "rdm" else "")
            + f"; {cfg.num_samples} samples, seed {cfg.seed}")


def fill_samples(name: str, setting: SampleSetting, cfg: Sample, files: Files, device: torch.device,
                 d: Dist) -> dict:
    """Fill (or resume) the sample store of one setting, then (main rank) its figures; -> the summary."""
    started = time.perf_counter()
    models = load_models(files.pixel, files.tokenizer, files.rdm, device)
    stored = open_stored_reps(files.reps)
    check_setting(name, setting, models, stored.identity if stored else None)
    m, batch = cfg.num_samples, cfg.batch_size
    labels = sample_labels(setting, models, m, cfg.seed)
    oracle = None
    if setting.reps == "stored":
        rows = oracle_rows(stored.array.shape[0], m, cfg.seed)
        order = np.argsort(rows, kind="stable")  # one sorted gather, then back into sample order
        oracle = np.empty((m, stored.dim), dtype=np.float32)
        oracle[order] = stored.array.oindex[rows[order], 0]
    identity = {"setting": setting.model_dump(mode="json"), "num_samples": m, "seed": cfg.seed,
                "models": models.hashes, "device": device.type, "bf16": uses_bf16(cfg.bf16, device),
                **({"rdm_sampler": cfg.rdm.model_dump(mode="json")} if setting.reps == "rdm" else {}),
                **({"reps_store": stored.identity} if setting.reps == "stored" else {})}
    attrs = {"setting": name, "settings": setting.model_dump(mode="json"), "models": models.hashes,
             "seeds": {"seed": cfg.seed, "stream": "pipeline.core.rng.seeded_generator(device, seed, chunk)",
                       "chunk_rows": batch}}
    h, w = models.image_size
    writer = SampleWriter(files.store, m, (h, w, 3), batch, identity, attrs,
                          models.pixel.rep_dim if setting.generator == "rep" else None, labels is not None,
                          d.rank, d.barrier)
    chunks = writer.pending(d.rank, d.world)
    timings = {"rdm": 0.0, "decode": 0.0, "vqgan": 0.0}
    for chunk in progress(chunks, desc=f"sample {name}", unit="chunk"):
        r = writer.rows(chunk)
        reps = torch.from_numpy(oracle[r.start:r.stop]) if oracle is not None else None
        out = generate(models, setting, cfg.rdm, len(r), chunk_generator(device, cfg.seed, chunk), reps=reps,
                       labels=None if labels is None else labels[r.start:r.stop], timings=timings, bf16=cfg.bf16)
        writer.write(chunk, out.images, out.reps, out.labels)
    d.barrier()
    summary = {"rank": d.rank, "chunks": len(chunks)}
    if d.is_main:
        writer.finalize({"seconds": round(time.perf_counter() - started, 2)})  # of the run that finished it
        pictures = write_figures(setting, cfg, models, files, stored, device)
        seconds = time.perf_counter() - started
        done = sum(len(writer.rows(c)) for c in chunks)
        summary = {"output": str(files.store), "num_samples": m, "images": [m, h, w, 3],
                   "figures": [str(p) for p in pictures], "generated_now": done, "chunks": len(chunks),
                   "world": d.world,
                   "seconds": round(seconds, 2), **{f"seconds_{k}": round(v, 2) for k, v in timings.items()}}
        log(f"sample {name}: {m} images {h}x{w} in {files.store} ({done} generated now by this process, "
            f"{', '.join(f'{k} {v:.1f}s' for k, v in timings.items())})")
    d.barrier()
    return summary


def real_images(shards: Path, reps_path: Path, reps: zarr.Array, count: int,
                size: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """``count`` evenly spaced train images (view 0, as their stored reps saw them, resized to the generated size)
    and their stored reps [count, D]."""
    train = ShardSet(shards, "train")
    if len(train) != reps.shape[0]:
        raise RcgError(f"{reps_path} holds {reps.shape[0]} rows but {shards} has {len(train)} train images")
    views = open_store(Path(reps_path), "reps").attrs.asdict()["identity"]["views"]
    recipe = ViewRecipe(**{k: views[k] for k in ("count", "resize", "crop", "flip", "seed")})
    rows = np.unique(np.linspace(0, len(train) - 1, count).round().astype(int))
    images = []
    for row in rows.tolist():
        view = make_view(decode_rgb(train.read(row)), train.keys[row], 0, recipe)
        if view.shape[:2] != size:
            view = np.asarray(Image.fromarray(view).resize(size[::-1], Image.BICUBIC))
        images.append(view)
    return np.stack(images), torch.from_numpy(np.asarray(reps.oindex[rows, 0], dtype=np.float32))


def edit_rows(models: Models, setting: SampleSetting, images: np.ndarray, reps: torch.Tensor, seed: int) -> np.ndarray:
    """Editing examples, one row per real image: the image, its centre half masked, regenerated from its own rep,
    and from the next image's rep -> uint8 [R, 4, H, W, 3]."""
    size = images.shape[1]
    box = (size // 4, size // 4, size - size // 4, size - size // 4)
    rows = []
    for i, image in enumerate(images):
        own, other = (edit(models, image, box, reps[j], setting.iterations, setting.temperature, setting.guidance,
                           figure_generator(models.device, seed, 3)) for j in (i, (i + 1) % len(images)))
        rows.append([image, shown_masked(own.canvas), own.image, other.image])
    return np.asarray(rows, dtype=np.uint8)


def write_figures(setting: SampleSetting, cfg: Sample, models: Models, files: Files, stored: StoredReps | None,
                  device: torch.device) -> list[Path]:
    """Every PNG of the setting, written together (a fresh folder swapped in place); seeded apart from the
    sample chunks, so they are the same on every run."""
    f, columns = cfg.figures, cfg.figures.columns
    samples = open_samples(files.store)
    pictures = {"samples.png": fig.grid(samples.images[:min(f.grid, len(samples))], columns, f.cell)}
    wanted = f.real_images + 2 * f.pairs
    if setting.generator == "rep" and stored is not None and files.shards is not None and wanted:
        images, reps = real_images(files.shards, files.reps, stored.array, wanted, models.image_size)
        if len(images) == wanted:  # a tiny train split can give fewer distinct rows
            reps = reps.to(device)
            if f.real_images:
                rows = rep_rows(models, setting, cfg.rdm, reps[:f.real_images], columns,
                                figure_generator(device, cfg.seed, 0))
                pictures["reps.png"] = fig.beside(images[:f.real_images], rows, f.cell)
            if f.pairs:
                a, b = slice(f.real_images, f.real_images + f.pairs), slice(f.real_images + f.pairs, wanted)
                rows = interpolation_rows(models, setting, cfg.rdm, reps[a], reps[b], columns, cfg.seed)
                pictures["interpolation.png"] = fig.beside(images[a], rows, f.cell, last=images[b])
            if f.real_images:
                pictures["edits.png"] = fig.tile(edit_rows(models, setting, images[:f.real_images],
                                                           reps[:f.real_images], cfg.seed), f.cell, gaps=(1,))
    ids = label_ids(setting, models)
    if ids is not None:
        rows = label_rows(models, setting, cfg.rdm, ids[:f.class_rows], columns,
                          figure_generator(device, cfg.seed, 2))
        kind = "clusters" if setting.generator == "cluster" else "classes"
        pictures[f"{kind}.png"] = fig.tile(rows, f.cell)
    with atomic_dir(files.figures) as tmp:
        for file, picture in pictures.items():
            fig.save_png(tmp / file, picture)
    return [files.figures / file for file in pictures]
