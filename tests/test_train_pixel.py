import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.artifacts import file_sha256, load_model, save_model_file, weights_sha256
from pipeline.core.config import EncoderModel
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.data.clusters import kmeans
from pipeline.data.pixel_data import PixelBatches, load_pixel_data
from pipeline.data.stores import StoreWriter
from pipeline.models.encoder import build_encoder
from pipeline.models.mage import MAGE, masked_token_loss
from pipeline.models.vqgan import VQGAN
import pipeline.train.pixel as recipe
from stages import train_pixel
from conftest import MICRO, micro_params
from official_files import rep_mage_file

N, V, H, W, K, D, CLASSES = 48, 2, 4, 4, 32, 16, 4
# Every conditioning; the random init (most stores here come without a tokenizer file: codebook_init has its test).
PIXEL = {"pixel": {"conditionings": ["rep", "none", "class", "cluster"],
                   "model": {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
                             "decoder_num_heads": 2},
                   "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 2,
                             "codebook_init": False},
                   "eval": {"num_images": 8, "batch_size": 4}, "cluster": {"k": 3, "iters": 10}}}
DOC = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
ENCODER = build_encoder(MICRO["encoder"]["model"])  # stands in for the encoder the rep store was made with
ENCODER_CONFIG = EncoderModel(**MICRO["encoder"]["model"]).model_dump()
VQ = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=K, in_channels=3, out_ch=3,
          beta=0.25)


OFFICIAL = {"vocab": "official", "grid_conv": 0}  # what an official MAGE file holds: no grid convolution


def params_for(root: Path, *overrides: str, extra: dict | None = None):
    tree = json.loads(json.dumps(PIXEL))
    for k, v in (extra or {}).items():
        tree["pixel"][k] = {**tree["pixel"].get(k, {}), **v} if isinstance(v, dict) else v
    return micro_params(root, list(overrides), extra=tree)


def write_stores(root: Path, index: str = "a" * 64, views: int = V, seed: int = 0, nan_row: int | None = None,
                 tokenizer_file: Path | None = None, n: int = N, bad_token: tuple[int, ...] | None = None) -> None:
    """A token store and a rep store of ``n`` images as tokenize / encode write them (identity layout included),
    made of random tokens whose first id tells the class: enough for the pixel stage to have something to learn.
    ``bad_token``: a (row, view, y, x) that holds the id K, one past the codebook."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    tokens = rng.integers(0, K, (n, views, H, W)).astype(np.uint16)
    reps = rng.standard_normal((n, views, D)).astype(np.float32)
    tokens[:, :, 0, 0] = labels[:, None]
    reps[:, :, 0] += labels[:, None]
    pair = np.arange(n * views).reshape(n, views)  # which (image, view) a token grid / rep is: they must meet
    tokens[:, :, 0, 1], reps[:, :, 1] = pair % K, pair
    if nan_row is not None:
        reps[nan_row, 0, 3] = np.nan
    if bad_token is not None:
        tokens[bad_token] = K
    shared = {"views": {"count": views, "crop": 16}, "index": {"sha256": index, "split": "train", "rows": n}}
    tok_sha = file_sha256(tokenizer_file) if tokenizer_file else "b" * 64
    stores = {"tokens": ({**shared, "tokenizer": {"sha256": tok_sha, "config": {"model": VQ}}, "grid": [H, W],
                          "codebook_size": K}, tokens, "uint16"),
              "reps": ({**shared, "encoder": {"sha256": "c" * 64, "config": {"model": ENCODER_CONFIG},
                                              "weights_sha256": weights_sha256(ENCODER.state_dict())}, "dim": D},
                       reps, "float32")}
    for name, (identity, values, dtype) in stores.items():
        writer = StoreWriter(root / "data" / f"{name}.zarr", name, values.shape, dtype, 16, identity, labels)
        for c in range(writer.num_chunks):
            writer.write(c, values[writer.rows(c)])
        writer.finalize()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The micro stage run once per conditioning."""
    root = tmp_path_factory.mktemp("pixel")
    write_stores(root)
    params = params_for(root)
    return root, params, {c: train_pixel.run(params, c) for c in ("rep", "none", "class", "cluster")}


def test_every_conditioning_trains_and_writes_its_outputs(trained):
    root, params, summaries = trained
    for cond, summary in summaries.items():
        model, payload = load_model("pixel", params.paths.models / f"pixel-{cond}.pt")
        assert model.conditioning == cond and payload["config"]["grid"] == [H, W]
        assert (model.codebook_size, model.seq_len, model.rep_dim) == (K, H * W, D)
        metrics = json.loads((params.paths.metrics / f"pixel-{cond}.json").read_text())
        assert all(isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 32) for v in metrics.values())
        assert all(f"`{k}`" in DOC for k in metrics)  # every figure's protocol is documented once
        assert 0 <= metrics["val_accuracy"] <= 1 and metrics["val_images"] == 8 and np.isfinite(metrics["val_loss"])
        rows = list(csv.DictReader(open(params.paths.plots / f"train_pixel-{cond}.csv")))
        assert [int(r["step"]) for r in rows] == [2, 4, 6] and {"loss", "accuracy", "lr"} <= set(rows[0])
        assert summary["source"] == "trained" and summary["steps"] == 6
    _, payload = load_model("pixel", params.paths.models / "pixel-class.pt")
    labels = payload["config"]["labels"]
    assert labels["num_labels"] == CLASSES and sum(labels["counts"]) == N - 8
    _, payload = load_model("pixel", params.paths.models / "pixel-cluster.pt")
    assert payload["config"]["labels"]["num_labels"] <= 3 and payload["config"]["labels"]["centroids"].shape[1] == D


def test_resumed_training_equals_uninterrupted(trained, tmp_path, monkeypatch):
    _, _, _ = trained
    write_stores(tmp_path)
    params = params_for(tmp_path)
    real = masked_token_loss
    calls = [0]

    def dying(model, tokens, c, *args, **kwargs):
        assert torch.equal(tokens[:, 1], c[:, 1].long() % K)  # tokens[i, v] always goes with reps[i, v]
        calls[0] += 1
        if calls[0] == 5:  # iteration 4: after the checkpoint at step 3
            raise KeyboardInterrupt("simulated kill")
        return real(model, tokens, c, *args, **kwargs)

    monkeypatch.setattr(recipe, "masked_token_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train_pixel.run(params, "rep")
    monkeypatch.setattr(recipe, "masked_token_loss", real)
    resumed = train_pixel.run(params, "rep")
    assert resumed["resumed_from"] == 3
    root, ref_params, _ = trained
    a = load_model("pixel", params.paths.models / "pixel-rep.pt")[0].state_dict()
    b = load_model("pixel", ref_params.paths.models / "pixel-rep.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_stops_naming_the_step(tmp_path, monkeypatch):
    write_stores(tmp_path)
    params = params_for(tmp_path)
    real, calls = masked_token_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss, acc = real(*args, **kwargs)
        return (loss * float("nan"), acc) if calls[0] == 4 else (loss, acc)

    monkeypatch.setattr(recipe, "masked_token_loss", poisoned)
    with pytest.raises(RcgError, match="non-finite loss .* at step 4"):
        train_pixel.run(params, "none")


def test_misaligned_and_bad_stores_are_refused(tmp_path):
    write_stores(tmp_path)
    other = tmp_path / "other"
    write_stores(other, index="d" * 64)
    (tmp_path / "data" / "tokens.zarr").rename(tmp_path / "keep.zarr")
    (other / "data" / "tokens.zarr").rename(tmp_path / "data" / "tokens.zarr")
    with pytest.raises(RcgError, match="not built from the same index"):
        train_pixel.run(params_for(tmp_path), "rep")
    nan = tmp_path / "nan"
    write_stores(nan, nan_row=5)
    with pytest.raises(RcgError, match="row 5 .view 0. holds NaN"):
        train_pixel.run(params_for(nan), "rep")
    with pytest.raises(RcgError, match="unknown conditioning 'pixels'"):
        train_pixel.run(params_for(nan), "pixels")
    with pytest.raises(RcgError, match="not in pixel.conditionings"):
        train_pixel.run(params_for(nan, "pixel.conditionings=[rep]"), "none")
    good = tmp_path / "good"
    write_stores(good)
    with pytest.raises(RcgError, match="leaves none"):
        train_pixel.run(params_for(good, "pixel.eval.num_images=48"), "rep")
    with pytest.raises(RcgError, match="exceeds the 40 training images"):
        train_pixel.run(params_for(good, "pixel.train.batch_size=64"), "rep")


def test_batches_pair_views_and_are_a_function_of_the_step(tmp_path):
    write_stores(tmp_path)
    data = load_pixel_data(tmp_path / "data" / "tokens.zarr", tmp_path / "data" / "reps.zarr", "rep", 8, 0,
                           torch.device("cpu"))
    assert not set(data.val_rows.tolist()) & set(data.train_rows.tolist()) and len(data.train_rows) == N - 8
    batches = PixelBatches(data, 8, 2, seed=0, d=Dist())
    (rows, views, _), (rows2, _, _) = batches(3)
    assert len(rows) == 4 and set(rows.tolist()) <= set(data.train_rows.tolist())
    again = PixelBatches(data, 8, 2, seed=0, d=Dist())(3)
    assert torch.equal(again[0][0], rows) and torch.equal(again[0][1], views)
    # one epoch covers every training image once; the views are both used
    seen = torch.cat([r for it in range(5) for r, _, _ in batches(it)])
    assert sorted(seen.tolist()) == sorted(data.train_rows.tolist())
    assert set(torch.cat([v for it in range(20) for _, v, _ in batches(it)]).tolist()) == {0, 1}
    assert torch.equal(data.tokens[rows, views, 1].long(), data.reps[rows, views, 1].long() % K)
    ranks = [PixelBatches(data, 8, 1, 0, Dist(rank=r, world=2))(0)[0][0] for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())


def _ddp_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real = train_pixel.train

    def keep(*args, **kwargs):
        model, ema, summary = real(*args, **kwargs)
        torch.save(model.state_dict(), Path(root) / f"rank{rank}.pt")
        return model, ema, summary

    train_pixel.train = keep
    train_pixel.run(params_for(Path(root), "pixel.train.accum_steps=2"), "class")
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_ddp_ranks_train_one_model(tmp_path):
    """Two gloo ranks, two accumulation micro-batches each: one set of weights, written once by rank 0."""
    import torch.multiprocessing as mp
    write_stores(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, payload = load_model("pixel", tmp_path / "data" / "models" / "pixel-class.pt")
    assert payload["summary"]["world"] == 2
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + torch.randn(50, 2, generator=g) * 0.3 for c in centres])
    c1, l1 = kmeans(x, 3, torch.Generator().manual_seed(1))
    c2, l2 = kmeans(x, 3, torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2) and torch.equal(c1, c2)
    assert all(len(set(l1[i * 50:(i + 1) * 50].tolist())) == 1 for i in range(3)) and len(set(l1.tolist())) == 3
    with pytest.raises(RcgError, match="pixel.cluster.k"):
        kmeans(x, 200, g)


# ------------------------------------------------------------------------------------ official file
def official_file(root: Path, model: MAGE, encoder: dict, vqgan: dict) -> Path:
    return rep_mage_file(root / "mage-official.pth", model, encoder, vqgan)


def stores_with_a_tokenizer(root: Path) -> tuple[VQGAN, Path]:
    """A VQGAN saved as data/models/tokenizer.pt and stores that record it as the tokenizer of their tokens."""
    torch.manual_seed(0)
    vqgan = VQGAN(**VQ)
    tokenizer = root / "data" / "models" / "tokenizer.pt"
    save_model_file(tokenizer, "rcg-tokenizer", {"model": VQ}, vqgan.state_dict())
    write_stores(root, tokenizer_file=tokenizer)
    return vqgan, tokenizer


def test_official_file_imported_and_checked_against_the_stores(tmp_path):
    vqgan, tokenizer = stores_with_a_tokenizer(tmp_path)
    arch = {"vocab": "official", "embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
            "decoder_depth": 1, "decoder_num_heads": 2}
    model = MAGE(codebook_size=K, seq_len=H * W, rep_dim=D, **arch)
    good = official_file(tmp_path, model, ENCODER.state_dict(), vqgan.state_dict())
    params = params_for(tmp_path, f"pixel.checkpoints.rep={good}", extra={"model": OFFICIAL})
    summary = train_pixel.run(params, "rep")
    assert (summary["source"], summary["encoder_check"], summary["vqgan_check"]) == ("official", "weights", "weights")
    loaded = load_model("pixel", params.paths.models / "pixel-rep.pt")[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    other_vq = VQGAN(**VQ).state_dict()
    bad = official_file(tmp_path, model, ENCODER.state_dict(), other_vq)
    with pytest.raises(RcgError, match="another tokenizer .*same architecture, different weights"):
        train_pixel.run(params_for(tmp_path, f"pixel.checkpoints.rep={bad}", extra={"model": OFFICIAL}),
                        "rep")
    other_enc = build_encoder(MICRO["encoder"]["model"]).state_dict()
    bad = official_file(tmp_path, model, other_enc, vqgan.state_dict())
    with pytest.raises(RcgError, match="this MAGE was trained with another encoder"):
        train_pixel.run(params_for(tmp_path, f"pixel.checkpoints.rep={bad}", extra={"model": OFFICIAL}),
                        "rep")
    with pytest.raises(RcgError, match="does not match pixel.model and the stores: vocab compact"):
        train_pixel.run(params_for(tmp_path, f"pixel.checkpoints.rep={good}"), "rep")
    with pytest.raises(RcgError, match="grid_conv 3 .file: 0.*set pixel.model.grid_conv: 0"):
        train_pixel.run(params_for(tmp_path, f"pixel.checkpoints.rep={good}", extra={"model": {"vocab": "official"}}),
                        "rep")


@pytest.mark.parametrize("name", ["imagenet256_vitb", "imagenet256_vitb_mage", "imagenet256_vitl", "cifar10",
                                  "cifar10_cpu"])
def test_presets_name_the_pixel_architecture(name):
    import yaml
    from pipeline.core.config import PRESETS_DIR, preset
    from pipeline.models.mage import MAGE_SIZES
    tree = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())["pixel"]["model"]
    assert {"vocab", *MAGE_SIZES["mage_base"]} <= set(tree)
    p = preset(name).pixel
    if name.startswith("imagenet"):  # the paper's sizes and recipe: lr 2.4e-3 at batch 4096
        size = MAGE_SIZES["mage_large" if name.endswith("vitl") else "mage_base"]
        assert {k: getattr(p.model, k) for k in size} == size and p.model.vocab == "official"
        assert p.model.grid_conv == 0  # MAGE as published: what official files hold
        assert p.train.batch_size == 4096 and p.train.blr * p.train.batch_size / 256 == pytest.approx(2.4e-3)


def test_real_micro_stores_train_and_an_official_file_built_from_their_models_passes(workspace):
    """The stores as encode / tokenize really write them (micro pipeline), then a file in the official layout
    embedding that very encoder and VQGAN: both checks compare weights."""
    import pipeline.models.encoder  # noqa: F401  (registers the "encoder" model kind)
    import pipeline.models.vqgan  # noqa: F401  (registers the "tokenizer" model kind)
    from stages import encode, pretrain_encoder, tokenize_views, train_tokenizer
    params = params_for(workspace)
    for stage in (pretrain_encoder, encode, train_tokenizer, tokenize_views):
        stage.run(params)
    summary = train_pixel.run(params, "rep")
    model, payload = load_model("pixel", params.paths.models / "pixel-rep.pt")
    grid = payload["config"]["grid"]
    assert summary["source"] == "trained" and model.seq_len == grid[0] * grid[1]
    encoder, _ = load_model("encoder", params.paths.models / "encoder.pt")
    vqgan, _ = load_model("tokenizer", params.paths.models / "tokenizer.pt")
    official = MAGE(**{**payload["config"]["model"], **OFFICIAL})
    path = official_file(workspace, official, encoder.state_dict(), vqgan.state_dict())
    params = params_for(workspace, f"pixel.checkpoints.rep={path}", extra={"model": OFFICIAL})
    summary = train_pixel.run(params, "rep")
    assert (summary["encoder_check"], summary["vqgan_check"]) == ("weights", "weights")


def test_codebook_init_starts_from_the_tokenizer_that_made_the_tokens(tmp_path):
    vqgan, tokenizer = stores_with_a_tokenizer(tmp_path)
    params = params_for(tmp_path, "pixel.train.codebook_init=true", "pixel.train.steps=1")
    train_pixel.run(params, "rep")
    codes = vqgan.state_dict()["quantize.embedding.weight"]
    model = MAGE(codebook_size=K, seq_len=H * W, rep_dim=D, vocab="compact", embed_dim=16, depth=1, num_heads=2,
                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    model.init_from_codebook(codes, torch.Generator().manual_seed(0))
    words = model.token_emb.word_embeddings.weight[:K].detach()
    assert abs(float(words.std()) - 0.02) < 1e-3
    centred = codes - codes.mean(0)
    # an orthogonal map keeps the geometry: pairwise distances are those of the code vectors, scaled
    ratio = torch.cdist(words, words)[~torch.eye(K, dtype=torch.bool)] / torch.cdist(centred, centred)[
        ~torch.eye(K, dtype=torch.bool)]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)
    write_stores(tmp_path)  # tokens recorded as made by another tokenizer file
    with pytest.raises(RcgError, match="was made by another tokenizer than .*tokenizer.pt"):
        train_pixel.run(params_for(tmp_path, "pixel.train.codebook_init=true", "pixel.train.steps=1"), "rep")
    tokenizer.unlink()
    with pytest.raises(RcgError, match="tokenizer.pt is missing"):
        train_pixel.run(params_for(tmp_path, "pixel.train.codebook_init=true", "pixel.train.steps=1"), "rep")
