import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import zarr

from conftest import kill_after, micro_params
from pipeline.core.artifacts import file_sha256, save_model_file, weights_sha256
from pipeline.core.distributed import Dist
from pipeline.models.encoder import MODEL_FORMAT, Encoder, build_encoder, represent
from pipeline.core.errors import RcgError
from pipeline.data.shards import ShardSet
from pipeline.data.stores import open_store, partial_path
from pipeline.models.view_encoder import build_rep_store
from pipeline.data.views import ViewRecipe, all_views
from stages import encode



def write_encoder(params, seed: int = 0) -> Encoder:
    """An "rcg-encoder" file at data/models/encoder.pt with non-trivial projector BN statistics."""
    config = params.encoder.model.model_dump()
    torch.manual_seed(seed)
    model = build_encoder(config)
    for m in model.head:
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    save_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT, {"model": config}, model.state_dict(),
                    summary={"source": "test"})
    return model.eval()


def reps(params) -> np.ndarray:
    return open_store(params.paths.reps, "reps")["reps"][:]



def test_store_layout_identity_and_metrics(workspace):
    params = micro_params(workspace)
    model = write_encoder(params)
    summary = encode.run(params)
    group = open_store(params.paths.reps, "reps")
    arr = group["reps"]
    shards = ShardSet(params.paths.shards)
    assert arr.shape == (48, 2, 16) and arr.dtype == np.float32 and arr.chunks == (16, 2, 16)
    assert summary["shape"] == [48, 2, 16] and summary["images"] == 48
    assert group["labels"][:].tolist() == shards.labels.tolist()
    ident = group.attrs["identity"]
    assert ident["encoder"]["sha256"] == file_sha256(params.paths.models / "encoder.pt")
    assert ident["encoder"]["config"] == {"model": params.encoder.model.model_dump()}
    # what train_rdm compares an official RDM's embedded encoder against
    assert ident["encoder"]["weights_sha256"] == weights_sha256(model.state_dict())
    assert ident["views"] == ViewRecipe(**params.views.model_dump()).describe()
    assert ident["index"]["rows"] == 48 and ident["index"]["split"] == "train"
    assert ident["dim"] == 16 and ident["normalization"]["input_size"] == 16
    assert ident["compute"] == {"device": "cpu", "precision": "fp32", "batch_size": 8}
    # each stored row is RCG's representation of that view of that image
    for i in (0, 21, 47):
        views = all_views(shards.read(i), shards.keys[i], ViewRecipe(**params.views.model_dump()))
        x = torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(torch.from_numpy(arr[i]), represent(model, x), atol=1e-5, rtol=1e-5)
    assert not np.array_equal(arr[:, 0], arr[:, 1])  # view 1 is the mirror, not a copy
    metrics = json.loads((params.paths.metrics / "encoder.json").read_text())
    assert metrics["knn_k"] == 5 and metrics["num_images"] == 48 and metrics["encoder"] == "test"
    assert metrics["labelled"] is True
    assert 0 <= metrics["knn_top1"] <= 1 and 0 <= metrics["knn_top1_random_init"] <= 1


def test_rerun_is_bit_identical(workspace):
    params = micro_params(workspace)
    write_encoder(params)
    encode.run(params)
    first = reps(params)
    encode.run(params)
    assert first.tobytes() == reps(params).tobytes()


def test_resume_after_kill_equals_full_run(workspace, monkeypatch):
    params = micro_params(workspace)
    write_encoder(params)
    encode.run(params)
    full = reps(params)

    kill_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        encode.run(params)
    monkeypatch.undo()
    partial = zarr.open_group(str(partial_path(params.paths.reps)), mode="r")
    assert partial["done"][:].tolist() == [1, 0, 0]
    assert full.tobytes() == reps(params).tobytes()  # the finished store is untouched until the swap

    # a chunk whose data landed but whose completion mark did not is redone, too
    partial = zarr.open_group(str(partial_path(params.paths.reps)), mode="r+")
    partial["reps"][16:32] = 7.0
    summary = encode.run(params)
    assert summary["images"] == 32  # only the two missing chunks were encoded
    assert full.tobytes() == reps(params).tobytes()
    assert not partial_path(params.paths.reps).exists()


class Sequential(Dist):
    """Ranks run one after another in this process: nothing to wait for."""

    def barrier(self) -> None:
        pass


def test_two_ranks_equal_one_process(workspace):
    params = micro_params(workspace)
    write_encoder(params)
    encode.run(params)
    single = reps(params)

    w0, s0 = build_rep_store(params, Sequential(rank=0, world=2), torch.device("cpu"))
    _, s1 = build_rep_store(params, Sequential(rank=1, world=2), torch.device("cpu"))
    assert (s0["images"], s1["images"]) == (32, 16)  # 3 chunks: rank 0 takes 0-1, rank 1 takes 2
    encode.finish(params, w0, s0)
    assert single.tobytes() == reps(params).tobytes()


def _torchrun_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RCG_PROGRESS="0")
    torch.set_num_threads(1)
    from pathlib import Path
    encode.run(micro_params(Path(root)))
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_gloo_ranks_equal_one_process(workspace):
    params = micro_params(workspace)
    write_encoder(params)
    encode.run(params)
    single = reps(params)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_torchrun_worker, args=(2, port, str(workspace)), nprocs=2, start_method="fork")
    assert single.tobytes() == reps(params).tobytes()


def test_partial_from_other_inputs_is_discarded(workspace, monkeypatch):
    params = micro_params(workspace)
    write_encoder(params, seed=0)
    kill_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        encode.run(params)
    monkeypatch.undo()
    write_encoder(params, seed=1)  # another encoder: its partial must not be appended to
    summary = encode.run(params)
    assert summary["images"] == 48
    other = reps(params)
    params.paths.reps.rename(params.paths.reps.with_name("old.zarr"))
    encode.run(params)
    assert other.tobytes() == reps(params).tobytes()

    kill_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        encode.run(params)
    monkeypatch.undo()
    more_views = micro_params(workspace, ["views.count=3"])
    summary = encode.run(more_views)
    assert summary["images"] == 48 and summary["shape"] == [48, 3, 16]
    np.testing.assert_allclose(reps(more_views)[:, :2], other, atol=1e-5)  # views 0/1 do not depend on the count


def test_knn_subset(workspace):
    params = micro_params(workspace, ["encode.knn_images=20"])
    write_encoder(params)
    encode.run(params)
    assert json.loads((params.paths.metrics / "encoder.json").read_text())["num_images"] == 20


def test_missing_or_wrong_model_file(workspace):
    params = micro_params(workspace)
    with pytest.raises(RcgError, match="no encoder model at .*encoder.pt: run `rcg pretrain-encoder`"):
        encode.run(params)
    save_model_file(params.paths.models / "encoder.pt", "rcg-tokenizer", {"model": {}}, {})
    with pytest.raises(RcgError, match="holds a 'rcg-tokenizer' model, expected 'rcg-encoder'"):
        encode.run(params)
    assert not params.paths.reps.exists()


def test_images_without_classes_get_no_probe(tmp_path):
    """A flat image folder has no labels (-1): the store is written, encoder.json says so in flat fields."""
    from pipeline.data.synthetic import write_builtin
    from stages import shard
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted(write_builtin(tmp_path / "src", "train", 16, 16, 0).rglob("*.png"))):
        png.rename(flat / f"{i:03d}.png")
    params = micro_params(tmp_path, ["data.source=folder", f"data.folder={flat}", "data.holdout=0"])
    shard.run(params)
    write_encoder(params)
    summary = encode.run(params)
    assert summary["shape"] == [16, 2, 16] and "knn_top1" not in summary
    metrics = json.loads((params.paths.metrics / "encoder.json").read_text())
    assert metrics == {"labelled": False, "knn_k": 5, "num_images": 0, "encoder": "test"}
