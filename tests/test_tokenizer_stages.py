import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import zarr

from conftest import kill_after, micro_params
from pipeline.data.alignment import check_aligned
from pipeline.core.artifacts import file_sha256, load_checkpoint, load_model, load_model_file, save_model_file
from pipeline.core.distributed import Dist
from pipeline.models.encoder import MODEL_FORMAT, build_encoder
from pipeline.core.errors import RcgError
from pipeline.data.images import decode_rgb
from pipeline.data.shards import ShardSet
from pipeline.data.stores import open_store, partial_path
from pipeline.data.views import ViewRecipe, make_view
from pipeline.models.vqgan import VQGAN, CodebookEMA, VectorQuantizer, model_kwargs
from pipeline.models.vqgan_loss import VQGANLoss
from pipeline.models.view_tokenizer import build_token_store
import pipeline.train.tokenizer as recipe
from stages import encode, eval_tokenizer, shard, train_tokenizer
from stages import tokenize_views as tokenize



def params_for(root: Path, *overrides: str):
    return micro_params(root, list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_shards) -> Path:
    """One micro training run (6 steps, D on from step 3, restarts every 2): its project root."""
    root = tmp_path_factory.mktemp("tok-trained")
    shutil.copytree(micro_shards, root / "data" / "shards")
    train_tokenizer.run(params_for(root))
    return root


@pytest.fixture
def tok_workspace(workspace, trained) -> Path:
    """A fresh workspace holding the trained micro tokenizer."""
    (workspace / "data" / "models").mkdir(parents=True)
    shutil.copy(trained / "data" / "models" / "tokenizer.pt", workspace / "data" / "models" / "tokenizer.pt")
    return workspace


def write_encoder(params, seed: int = 0) -> None:
    config = params.encoder.model.model_dump()
    torch.manual_seed(seed)
    save_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT, {"model": config},
                    build_encoder(config).state_dict(), summary={"source": "test"})


def tokens(params) -> np.ndarray:
    return open_store(params.paths.tokens, "tokens")["tokens"][:]


# ------------------------------------------------------------------------------------------ training
def test_training_writes_a_loadable_model_and_curves(trained):
    params = params_for(trained)
    model, payload = load_model("tokenizer", params.paths.models / "tokenizer.pt")
    assert isinstance(model, VQGAN) and payload["format"] == "rcg-tokenizer" and not model.training
    assert payload["config"]["model"] == model_kwargs(params.tokenizer.model)
    summary = payload["summary"]
    assert summary["source"] == "trained" and summary["steps"] == 6
    assert set(summary["final"]) == set(recipe.CURVES)
    with open(params.paths.plots / "train_tokenizer.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert float(rows[0]["d"]) == 0 and float(rows[0]["g"]) == 0  # D is off before disc_start (3)
    assert float(rows[2]["d"]) > 0
    assert 0 < float(rows[2]["usage"]) <= 1 and 1 <= float(rows[2]["perplexity"]) <= 32
    torch.manual_seed(params.seed)
    init = VQGAN(**payload["config"]["model"])
    assert not torch.equal(init.encoder.conv_in.weight, model.encoder.conv_in.weight)


def test_cosine_decays_the_learning_rate(workspace):
    """tokenizer.train.cosine: the lr both optimisers get falls from lr at the first step to ~0 at the last."""
    params = params_for(workspace, "tokenizer.train.cosine=true", "tokenizer.train.log_every=1")
    train_tokenizer.run(params)
    with open(params.paths.plots / "train_tokenizer.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    base = params.tokenizer.train.lr
    assert lrs[0] == base and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.1 * base


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_clip_reaches_both_updates(workspace, monkeypatch, clip):
    """tokenizer.train.grad_clip clips the VQGAN's and the PatchGAN's updates alike; unset, neither is clipped."""
    from pipeline.train.loop import TrainLoop
    seen, step = [], TrainLoop._clip_and_step

    def recording(optimizer, clip):
        seen.append((len(optimizer.param_groups[0]["params"]), clip))
        return step(optimizer, clip)

    monkeypatch.setattr(TrainLoop, "_clip_and_step", staticmethod(recording))
    params = params_for(workspace, *([f"tokenizer.train.grad_clip={clip}"] if clip else []))
    train_tokenizer.run(params)
    t = params.tokenizer.train
    assert len(seen) == t.steps + (t.steps - t.disc_start) and {c for _, c in seen} == {clip}
    assert len({n for n, _ in seen}) == 2  # two optimisers: the generator's and the discriminator's


def test_codebook_ema_follows_assigned_means():
    q = VectorQuantizer(4, 2)
    weight = q.embedding.weight.requires_grad_(False)
    ema = CodebookEMA(q, decay=0.5)
    start = weight.clone()
    z = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 0.0], [1.0, 3.0]])
    ema.update(weight, z, torch.tensor([0, 0, 1, 3]))
    assert ema.cluster_size.tolist() == [1.5, 1.0, 0.5, 1.0]
    n = 4.0  # Laplace-smoothed sizes, then the running sums over them
    size = (ema.cluster_size + 1e-5) / (n + 4e-5) * n
    means = torch.stack([0.5 * start[0] + 0.5 * torch.tensor([2.0, 2.0]), 0.5 * start[1] + 0.5 * z[2],
                         0.5 * start[2], 0.5 * start[3] + 0.5 * z[3]]) / size[:, None]
    torch.testing.assert_close(weight, means)
    for _ in range(30):  # with the same assignments the codes converge to the assigned means
        ema.update(weight, z, torch.tensor([0, 0, 1, 3]))
    torch.testing.assert_close(weight[[0, 1, 3]], torch.tensor([[1.0, 1.0], [4.0, 0.0], [1.0, 3.0]]), atol=1e-4,
                               rtol=0)
    weight[2] = torch.tensor([5.0, 5.0])  # a restart elsewhere: statistics start over at the new place
    ema.reset(weight, torch.tensor([2]))
    assert ema.cluster_size[2] == 1.0 and ema.embed_sum[2].tolist() == [5.0, 5.0]


def test_resume_after_kill_gives_the_uninterrupted_weights(trained, workspace, monkeypatch):
    params = params_for(workspace)
    real = VQGANLoss.generator_loss

    def dies_at_iteration_4(self, x, xrec, qloss, it, last_layer):
        if it == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(self, x, xrec, qloss, it, last_layer)

    monkeypatch.setattr(VQGANLoss, "generator_loss", dies_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer.run(params)
    monkeypatch.undo()
    assert not (params.paths.models / "tokenizer.pt").exists()
    summary = train_tokenizer.run(params)
    assert summary["resumed_from"] == 3  # checkpoint_every 3; the restart at step 4 used saved usage counts
    want = load_model_file(trained / "data" / "models" / "tokenizer.pt", "rcg-tokenizer")
    got = load_model_file(params.paths.models / "tokenizer.pt", "rcg-tokenizer")
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    assert got["summary"]["final"] == want["summary"]["final"]
    with open(params.paths.plots / "train_tokenizer.csv") as f, open(trained / "metrics" / "plots" /
                                                                     "train_tokenizer.csv") as g:
        assert f.read() == g.read()  # step 4's row spans the kill (checkpoint at 3): its window was saved
    again = train_tokenizer.run(params)  # finished state: no steps, the same file and figures
    assert again["resumed_from"] == 6 and again["final"] == summary["final"]
    redo = load_model_file(params.paths.models / "tokenizer.pt", "rcg-tokenizer")
    assert all(torch.equal(redo["state_dict"][k], v) for k, v in want["state_dict"].items())


def test_a_data_change_retrains(trained, tmp_path):
    """New images under the same params (data.builtin.seed is no training param) must not resume the finished state:
    the resume identity holds the shard index hash, which holds every image's content hash."""
    shutil.copytree(trained / "data", tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "shards")
    shard.run(params_for(tmp_path, "data.builtin.seed=1"))
    summary = train_tokenizer.run(params_for(tmp_path, "data.builtin.seed=1"))
    assert summary["resumed_from"] == 0
    old = load_model_file(trained / "data" / "models" / "tokenizer.pt", "rcg-tokenizer")["state_dict"]
    new = load_model_file(tmp_path / "data" / "models" / "tokenizer.pt", "rcg-tokenizer")["state_dict"]
    assert not torch.equal(old["encoder.conv_in.weight"], new["encoder.conv_in.weight"])
    # how to run is not part of the identity: other cadences and workers resume the finished state
    again = train_tokenizer.run(params_for(tmp_path, "data.builtin.seed=1", "tokenizer.train.log_every=3",
                                           "tokenizer.train.checkpoint_every=2", "tokenizer.train.workers=1"))
    assert again["resumed_from"] == 6


def _train_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RCG_PROGRESS="0")
    torch.set_num_threads(1)
    models, losses = [], []

    class Recorded(VQGAN):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            models.append(self)

    class RecordedLoss(VQGANLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            losses.append(self)

    recipe.VQGAN, recipe.VQGANLoss = Recorded, RecordedLoss
    train_tokenizer.run(params_for(Path(root)))
    torch.save({"model": models[0].state_dict(), "disc": losses[0].discriminator.state_dict()},
               Path(root) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_ddp_ranks_keep_one_model(workspace):
    """Two gloo ranks, 6 steps with D from step 3: DDP averages the VQGAN's and the discriminator's gradients
    (TrainLoop.wrap), the codebook EMA all-reduces its statistics and restarts are broadcast, so both ranks end
    with the same generator and discriminator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_train_worker, args=(2, port, str(workspace)), nprocs=2, start_method="fork")
    a, b = (torch.load(workspace / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("model", "disc"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    saved = load_model_file(workspace / "data" / "models" / "tokenizer.pt", "rcg-tokenizer")["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in a["model"].items())
    state = load_checkpoint(workspace / "data" / "state" / "train_tokenizer.pt")["modules"]
    assert all(torch.equal(state["disc"][k], v) for k, v in a["disc"].items())


def test_official_import_round_trip(workspace):
    kwargs = model_kwargs(params_for(workspace).tokenizer.model)
    torch.manual_seed(3)
    src = VQGAN(**kwargs)
    ckpt = workspace / "vqgan_raw.ckpt"
    torch.save(src.state_dict(), ckpt)  # the released file is a bare state dict
    params = params_for(workspace, f"tokenizer.checkpoint={ckpt}")
    summary = train_tokenizer.run(params)
    assert summary["source"] == "official" and summary["sha256"] == file_sha256(ckpt)
    model, payload = load_model("tokenizer", params.paths.models / "tokenizer.pt")
    assert payload["config"]["model"] == kwargs and payload["summary"]["checkpoint"] == str(ckpt)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_official_import_names_differing_fields(workspace):
    kwargs = model_kwargs(params_for(workspace).tokenizer.model)
    ckpt = workspace / "vqgan_raw.ckpt"
    torch.save(VQGAN(**{**kwargs, "n_embed": 64, "ch_mult": [1, 1, 2]}).state_dict(), ckpt)
    with pytest.raises(RcgError, match=r"does not match tokenizer.model \(ch_mult: file \[1, 1, 2\] vs params "
                                       r"\[1, 2\]; n_embed: file 64 vs params 32\)"):
        train_tokenizer.run(params_for(workspace, f"tokenizer.checkpoint={ckpt}"))


def test_bad_training_config_is_refused(workspace):
    with pytest.raises(RcgError, match="too small for tokenizer.train.disc_layers"):
        train_tokenizer.run(params_for(workspace, "tokenizer.train.disc_layers=3"))  # needs >= 24 px crops
    with pytest.raises(RcgError, match="views.crop \\(12\\) must be a multiple of .* factor 8"):
        train_tokenizer.run(params_for(workspace, "views.crop=12", "tokenizer.model.ch_mult=[1,1,1,2]"))
    with pytest.raises(RcgError, match="exceeds 65536"):
        params_for(workspace, "tokenizer.model.n_embed=70000")


# ------------------------------------------------------------------------------------------ tokenize
def test_token_store_layout_identity_and_pixels(tok_workspace):
    params = params_for(tok_workspace)
    summary = tokenize.run(params)
    group = open_store(params.paths.tokens, "tokens")
    arr = group["tokens"]
    assert arr.shape == (48, 2, 8, 8) and arr.dtype == np.uint16 and arr.chunks == (16, 2, 8, 8)
    assert summary["shape"] == [48, 2, 8, 8] and summary["images"] == 48
    shards = ShardSet(params.paths.shards)
    assert group["labels"][:].tolist() == shards.labels.tolist()
    ident = group.attrs["identity"]
    model_file = params.paths.models / "tokenizer.pt"
    assert ident["tokenizer"] == {"sha256": file_sha256(model_file),
                                  "config": load_model_file(model_file, "rcg-tokenizer")["config"]}
    recipe = ViewRecipe(**params.views.model_dump())
    assert ident["views"] == recipe.describe()
    assert ident["index"]["rows"] == 48 and ident["index"]["split"] == "train"
    assert ident["grid"] == [8, 8] and ident["codebook_size"] == 32
    data = arr[:]
    assert data.max() < 32 and len(np.unique(data)) > 4
    # tokens[i, v] are the VQGAN's tokens of make_view(image i, v), the function encode uses too
    model = load_model("tokenizer", model_file)[0].eval()
    for i, v in [(0, 0), (0, 1), (21, 1), (47, 0)]:
        view = make_view(decode_rgb(shards.read(i)), shards.keys[i], v, recipe)
        x = torch.from_numpy(view.copy()).permute(2, 0, 1)[None].float() / 255
        assert np.array_equal(data[i, v], model.encode_to_indices(x)[0].numpy()), (i, v)
    assert not np.array_equal(data[:, 0], data[:, 1])


def test_tokenize_rerun_is_bit_identical(tok_workspace):
    params = params_for(tok_workspace)
    tokenize.run(params)
    first = tokens(params)
    tokenize.run(params)
    assert first.tobytes() == tokens(params).tobytes()



def test_killed_tokenize_resumes(tok_workspace, monkeypatch):
    params = params_for(tok_workspace)
    tokenize.run(params)
    full = tokens(params)
    shutil.rmtree(params.paths.tokens)
    kill_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        tokenize.run(params)
    monkeypatch.undo()
    assert zarr.open_group(str(partial_path(params.paths.tokens)), mode="r")["done"][:].tolist() == [1, 0, 0]
    summary = tokenize.run(params)
    assert summary["images"] == 32  # only the two missing chunks
    assert full.tobytes() == tokens(params).tobytes()


class Sequential(Dist):
    def barrier(self) -> None:
        pass


def test_two_ranks_equal_one_process(tok_workspace):
    params = params_for(tok_workspace)
    tokenize.run(params)
    single = tokens(params)
    w0, s0 = build_token_store(params, Sequential(rank=0, world=2), torch.device("cpu"))
    _, s1 = build_token_store(params, Sequential(rank=1, world=2), torch.device("cpu"))
    assert (s0["images"], s1["images"]) == (32, 16)
    w0.finalize()
    assert single.tobytes() == tokens(params).tobytes()


def test_missing_tokenizer_and_crop_not_divisible(workspace, tok_workspace):
    with pytest.raises(RcgError, match="no tokenizer model at .*tokenizer.pt: run `rcg train-tokenizer`"):
        tokenize.run(params_for(workspace / "elsewhere"))
    with pytest.raises(RcgError, match=r"views.crop \(15\) is not a multiple of .* factor 2"):
        tokenize.run(params_for(tok_workspace, "views.crop=15"))


# ------------------------------------------------------------------------------------------ alignment
def test_check_aligned_accepts_same_views_refuses_others(tok_workspace):
    params = params_for(tok_workspace)
    write_encoder(params)
    encode.run(params)
    tokenize.run(params)
    model_file = params.paths.models / "tokenizer.pt"
    assert check_aligned(params.paths.tokens, params.paths.reps, model_file) == (48, 2)

    other = params_for(tok_workspace / "other", "views.seed=1", "views.count=3")
    shutil.copytree(params.paths.shards, other.paths.shards)
    shutil.copytree(params.paths.models, other.paths.models)
    tokenize.run(other)
    with pytest.raises(RcgError, match=r"tokens.zarr and .*reps.zarr were not built from the same views "
                                       r"\(rerun `rcg encode` and `rcg tokenize`.*'count': 3"):
        check_aligned(other.paths.tokens, params.paths.reps)

    retrained = tok_workspace / "retrained.pt"
    model, payload = load_model("tokenizer", model_file)
    save_model_file(retrained, "rcg-tokenizer", payload["config"], {k: v + 1 for k, v in model.state_dict().items()})
    with pytest.raises(RcgError, match=r"tokens.zarr was made by another tokenizer than .*retrained.pt"):
        check_aligned(params.paths.tokens, params.paths.reps, retrained)


# ------------------------------------------------------------------------------------------ eval
def test_eval_metrics(tok_workspace):
    params = params_for(tok_workspace)
    write_encoder(params)
    summary = eval_tokenizer.run(params)
    metrics = json.loads((params.paths.metrics / "tokenizer.json").read_text())
    assert metrics["split"] == "val" and metrics["num_images"] == 16 and metrics["grid_h"] == metrics["grid_w"] == 8
    assert metrics["codebook_size"] == 32 and metrics["tokenizer"] == "trained"
    assert 5 < metrics["psnr"] < 60
    assert 0 < metrics["usage"] <= 1 and 1 <= metrics["perplexity"] <= 32
    assert metrics["fd_rep"] > 0 and metrics["fd_rep_halves"] > 0
    assert summary["psnr"] == metrics["psnr"]
    few = params_for(tok_workspace, "tokenizer.eval.num_images=6")
    eval_tokenizer.run(few)
    assert json.loads((params.paths.metrics / "tokenizer.json").read_text())["num_images"] == 6
