"""Sampling: the sample store contract, figures, RCG's two passes (determinism, rank split, conditioning),
the sample stage, editing, and the bad-input checks. Every model is micro-sized and built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import SampleSetting
from pipeline.core.errors import RcgError
from pipeline.data.sample_store import SampleWriter, open_samples
from pipeline.gen import figures as fig
from conftest import micro_params


# ------------------------------------------------------------------------------------------- store
def _write_store(path, m=10, chunk=4, rep_dim=3, labels=True, chunks=None):
    w = SampleWriter(path, m, (8, 8, 3), chunk, {"x": 1}, {"setting": "t", "models": {"pixel": "ab"},
                                                              "seeds": {"seed": 0}}, rep_dim, labels)
    for c in (w.pending() if chunks is None else chunks):
        r = w.rows(c)
        images = np.full((len(r), 8, 8, 3), c, dtype=np.uint8)
        w.write(c, images, np.full((len(r), rep_dim), c, np.float32) if rep_dim else None,
                np.arange(r.start, r.stop) if labels else None)
    return w


def test_store_contract_and_resume(tmp_path):
    path = tmp_path / "s.zarr"
    w = _write_store(path, chunks=[0, 2])
    with pytest.raises(RcgError, match="still missing"):
        w.finalize()
    w = SampleWriter(path, 10, (8, 8, 3), 4, {"x": 1}, {}, 3, True)  # same identity: resumed
    assert w.pending() == [1] and w.pending(0, 2) == [1] and w.pending(1, 2) == []
    _write_store(path, chunks=[1]).finalize()
    s = open_samples(path)
    assert s.images.dtype == np.uint8 and s.images.shape == (10, 8, 8, 3) and len(s) == 10
    assert s.reps.dtype == np.float32 and s.reps.shape == (10, 3)
    assert s.labels.dtype == np.int64 and s.labels[:].tolist() == list(range(10))
    assert s.images[5, 0, 0, 0] == 1 and s.attrs["setting"] == "t" and s.attrs["models"] == {"pixel": "ab"}
    assert s.attrs["seeds"] == {"seed": 0} and s.attrs["complete"]


def test_store_refuses_other_identity_and_wrong_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path, chunks=[0])
    w = SampleWriter(path, 10, (8, 8, 3), 4, {"x": 2}, {}, None, False)  # other inputs: started afresh
    assert w.pending() == [0, 1, 2] and "reps" not in w.group and "labels" not in w.group
    with pytest.raises(RcgError, match="conditioning"):
        w.write(0, np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 3), np.float32))
    with pytest.raises(RcgError, match="uint8"):
        w.write(0, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(RcgError, match="incomplete"):
        open_samples(path.with_name("s.zarr.partial"))


# ------------------------------------------------------------------------------------------ figures
def test_figure_layouts(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    g = fig.grid(imgs, 3, cell=8)  # 2 rows of 3 cells of 8 px (upscaled x2), pad 2
    assert g.shape == (2 + 2 * 10, 2 + 3 * 10, 3)
    assert (g[2:10, 2:10] == imgs[0].repeat(2, 0).repeat(2, 1)).all()
    assert (g[12:20, 22:30] == 255).all()  # the padded sixth cell
    b = fig.beside(imgs[:2], np.stack([imgs[:3], imgs[1:4]]), last=imgs[3:5])
    assert b.shape == (2 + 2 * 6, 2 + 5 * 6 + 2 * fig.GAP, 3)
    assert (b[2:6, 2:6] == imgs[0]).all() and (b[8:12, -6:-2] == imgs[4]).all()
    r = fig.interleave(imgs[:4], imgs[1:5], 2)
    assert r.shape == (2 + 2 * 6, 2 + 4 * 6, 3) and (r[2:6, 8:12] == imgs[1]).all()
    path = fig.save_png(tmp_path / "f" / "g.png", g)
    assert (np.asarray(Image.open(path)) == g).all()
    with pytest.raises(RcgError, match="uint8"):
        fig.tile(np.zeros((1, 1, 4, 4, 3), np.float32))


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, fragment", [
    ("sample.settings.rcg.guidance=-1", "guidance"),
    ("sample.settings.rcg.temperature=-0.5", "temperature"),
    ("sample.settings.rcg.iterations=0", "iterations"),
    ("sample.settings.baseline.reps=rdm", "reps"),
    ("sample.settings.oracle.reps=null", "reps"),
    ("sample.settings.baseline.classes=[1]", "classes"),
])
def test_bad_settings_name_the_key(tmp_path, override, fragment):
    with pytest.raises(RcgError, match="invalid params") as err:
        micro_params(tmp_path, [override])
    assert fragment in str(err.value) and "sample.settings." in str(err.value)


# ------------------------------------------------------------------------------------------ models
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from pipeline.core.artifacts import file_sha256, load_model, save_model_file  # noqa: E402
from pipeline.data.stores import StoreWriter  # noqa: E402
from pipeline.data.views import ViewRecipe  # noqa: E402
from pipeline.gen import rcg  # noqa: E402
from pipeline.gen.editing import edit, make_canvas  # noqa: E402
from pipeline.models.mage import MAGE  # noqa: E402
from pipeline.models.rdm import RDM  # noqa: E402
from pipeline.samplers.diffusion import sample_reps  # noqa: E402
from pipeline.models.vqgan import VQGAN  # noqa: E402
from pipeline.gen import sampling  # noqa: E402
from stages import sample as sample_stage  # noqa: E402

DIM, CODES, ENCODER = 16, 32, "e" * 64
VQ = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=CODES)  # 16 px -> 8x8


def save_tokenizer(path, **over):
    torch.manual_seed(0)
    kwargs = {**VQ, **over}
    save_model_file(path, "rcg-tokenizer", {"model": kwargs}, VQGAN(**kwargs).state_dict())
    return path


def save_rdm(path, class_cond=False, dim=DIM, n_classes=10, encoder=ENCODER):
    torch.manual_seed(1)
    kwargs = dict(class_cond=class_cond, n_classes=n_classes if class_cond else 1, in_channels=dim,
                  time_embed_dim=16, model_channels=32, bottleneck_channels=32, out_channels=dim,
                  num_res_blocks=2, embed_dim=16)
    model = RDM(**kwargs)
    with torch.no_grad():  # the official init starts every residual branch at zero: give them a signal
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_model_file(path, "rcg-rdm", {"model": kwargs, "diffusion": {}, "store": {"encoder": {"weights_sha256": encoder}}},
                    model.state_dict())
    return path


def save_pixel(path, tokenizer, conditioning="rep", num_labels=0, dim=DIM, codes=CODES, encoder=ENCODER):
    torch.manual_seed(2)
    kwargs = dict(codebook_size=codes, seq_len=64, rep_dim=dim, conditioning=conditioning, num_labels=num_labels,
                  vocab="compact", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                  decoder_num_heads=2)
    model = MAGE(**kwargs)
    config = {"model": kwargs, "conditioning": conditioning, "grid": [8, 8],
              "labels": {"source": conditioning, "num_labels": num_labels} if num_labels else None,
              "reps": {"encoder": {"weights_sha256": encoder}},
              "tokens": {"tokenizer": {"sha256": file_sha256(tokenizer)}}}
    save_model_file(path, "rcg-pixel", config, model.state_dict())
    return path


def write_reps(path, n=48, dim=DIM):
    reps = np.random.default_rng(3).standard_normal((n, 2, dim)).astype(np.float32)
    identity = {"views": ViewRecipe(count=2, resize=16, crop=16).describe(), "dim": dim,
                "encoder": {"weights_sha256": ENCODER}}
    w = StoreWriter(path, "reps", (n, 2, dim), "float32", 16, identity, np.zeros(n, np.int64))
    for c in w.pending():
        r = w.rows(c)
        w.write(c, reps[r.start:r.stop])
    w.finalize()
    return reps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-models")
    tok = save_tokenizer(root / "tokenizer.pt")
    return {"root": root, "tokenizer": tok, "rdm": save_rdm(root / "rdm.pt"),
            "rdm_class": save_rdm(root / "rdm-class.pt", class_cond=True),
            "rep": save_pixel(root / "pixel-rep.pt", tok), "none": save_pixel(root / "pixel-none.pt", tok, "none"),
            "class": save_pixel(root / "pixel-class.pt", tok, "class", 10)}


def setting(**kw):
    return SampleSetting(**{"generator": "rep", "reps": "rdm", "iterations": 4, **kw})


RDM_SAMPLER = dict(steps=10)


def test_two_passes_are_deterministic_per_seed(files):
    from pipeline.core.config import RdmSample
    models = rcg.load_models(files["rep"], files["tokenizer"], files["rdm"], torch.device("cpu"))
    sampler = RdmSample(**RDM_SAMPLER)
    s = setting(guidance=1.0)
    a = rcg.generate(models, s, sampler, 3, rcg.chunk_generator(torch.device("cpu"), 0, 5))
    b = rcg.generate(models, s, sampler, 3, rcg.chunk_generator(torch.device("cpu"), 0, 5))
    c = rcg.generate(models, s, sampler, 3, rcg.chunk_generator(torch.device("cpu"), 0, 6))
    assert a.images.shape == (3, 16, 16, 3) and a.images.dtype == np.uint8
    assert (a.images == b.images).all() and (a.reps == b.reps).all() and torch.equal(a.tokens, b.tokens)
    assert not (a.reps == c.reps).all() and not torch.equal(a.tokens, c.tokens)
    # the first pass is the RDM's own sampler on the same stream: the reps are exactly its samples
    gen = rcg.chunk_generator(torch.device("cpu"), 0, 5)
    reps = sample_reps(models.rdm.model, models.rdm.diffusion, torch.zeros(3, dtype=torch.long), steps=10,
                       eta=sampler.eta, generator=gen)
    assert np.array_equal(a.reps, reps.numpy())
    # the VQGAN pass: the tokens' decoding, truncated (not rounded) to uint8
    x = models.tokenizer.decode_indices(a.tokens)
    assert np.array_equal(a.images, (x * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_oracle_and_labels_condition_what_they_say(files):
    from pipeline.core.config import RdmSample
    cpu = torch.device("cpu")
    models = rcg.load_models(files["rep"], files["tokenizer"], None, cpu)
    reps = torch.randn(2, DIM)
    out = rcg.generate(models, setting(reps="stored"), RdmSample(), 2, rcg.chunk_generator(cpu, 0, 0), reps=reps)
    assert np.array_equal(out.reps, reps.numpy())
    models = rcg.load_models(files["class"], files["tokenizer"], None, cpu)
    s = setting(generator="class", reps=None, classes=[3, 7])
    assert rcg.sample_labels(s, models, 5, 0).tolist() == [3, 7, 3, 7, 3]  # given ids: cycled in order
    models.pixel.label_counts = [0, 1, 0, 3] + [0] * 6  # no ids given: the training frequencies, exactly
    drawn = rcg.sample_labels(setting(generator="class", reps=None), models, 8, 0)
    assert sorted(drawn.tolist()) == [1, 1, 3, 3, 3, 3, 3, 3] and drawn.tolist() != sorted(drawn.tolist())
    a = rcg.generate(models, s, RdmSample(), 2, rcg.chunk_generator(cpu, 0, 0), labels=np.array([3, 3]))
    b = rcg.generate(models, s, RdmSample(), 2, rcg.chunk_generator(cpu, 0, 0), labels=np.array([7, 7]))
    assert a.reps is None and a.labels.tolist() == [3, 3] and not torch.equal(a.tokens, b.tokens)
    models = rcg.load_models(files["rep"], files["tokenizer"], files["rdm_class"], cpu)
    s = setting()
    assert rcg.sample_labels(s, models, 12, 0).tolist() == list(range(10)) + [0, 1]  # class-cond RCG: in turn
    x = rcg.generate(models, s, RdmSample(**RDM_SAMPLER), 2, rcg.chunk_generator(cpu, 0, 0), labels=np.array([1, 1]))
    y = rcg.generate(models, s, RdmSample(**RDM_SAMPLER), 2, rcg.chunk_generator(cpu, 0, 0), labels=np.array([2, 2]))
    assert not np.array_equal(x.reps, y.reps)  # the labels reach the RDM


@pytest.fixture
def project(workspace, files):
    """A micro project root with the model files in data/models and a reps store for the shards' 48 images."""
    import shutil
    models = workspace / "data" / "models"
    models.mkdir(parents=True)
    for name, key in (("tokenizer.pt", "tokenizer"), ("rdm.pt", "rdm"), ("pixel-rep.pt", "rep"),
                      ("pixel-none.pt", "none"), ("pixel-class.pt", "class")):
        shutil.copy(files[key], models / name)
    reps = write_reps(workspace / "data" / "reps.zarr")
    over = ["sample.num_samples=6", "sample.batch_size=4", "sample.rdm.steps=10",
            "sample.figures.grid=6", "sample.figures.columns=3", "sample.figures.real_images=2",
            "sample.figures.pairs=1", "sample.figures.class_rows=2", "sample.figures.cell=16"]
    over += [f"sample.settings.{n}.iterations=4" for n in ("rcg", "rcg_cfg", "baseline", "oracle", "class", "cluster")]
    return micro_params(workspace, over), reps


def test_stage_writes_the_contract_and_figures(project):
    params, reps = project
    summary = sample_stage.run(params, "oracle")
    s = open_samples(params.paths.data / "samples" / "oracle.zarr")
    assert s.images.shape == (6, 16, 16, 3) and s.labels is None and s.attrs["setting"] == "oracle"
    rows = rcg.oracle_rows(48, 6, params.sample.seed)
    assert np.array_equal(s.reps[:], reps[rows, 0])  # the stored reps of real images, view 0
    assert set(s.attrs["models"]) == {"pixel", "tokenizer"} and s.attrs["seeds"]["seed"] == 0
    names = sorted(p.rsplit("/", 1)[1] for p in summary["figures"])
    assert names == ["edits.png", "interpolation.png", "reps.png", "samples.png"]
    for p in summary["figures"]:
        assert Image.open(p).size[0] > 16
    summary = sample_stage.run(params, "class")
    s = open_samples(params.paths.data / "samples" / "class.zarr")
    assert s.reps is None and s.labels[:].tolist() == [0, 1, 2, 3, 4, 5]
    assert sorted(p.rsplit("/", 1)[1] for p in summary["figures"]) == ["classes.png", "samples.png"]
    sample_stage.run(params, "baseline")
    s = open_samples(params.paths.data / "samples" / "baseline.zarr")
    assert s.reps is None and s.labels is None
    again = sample_stage.run(params, "baseline")  # complete: regenerated from scratch gives the same bytes
    assert again["generated_now"] == 6 and np.array_equal(open_samples(s.path).images[:], s.images[:])


@dataclass(frozen=True)
class ThreadDist:
    """Two ranks as threads of one process, meeting at a real barrier (gloo is not needed to test the split)."""
    rank: int
    world: int
    sync: threading.Barrier
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.sync.wait(timeout=120)


def test_rank_split_equals_one_process(project, tmp_path):
    from pipeline.core.distributed import Dist
    params, _ = project
    cfg, setting_ = params.sample, params.sample.settings["rcg"]
    cpu = torch.device("cpu")
    one = sample_stage.dvc_files(params, "rcg")
    sampling.fill_samples("rcg", setting_, cfg, one, cpu, Dist())
    split = sampling.Files(**{**one.__dict__, "store": tmp_path / "rcg.zarr", "figures": tmp_path / "fig"})
    sync, results = threading.Barrier(2), {}

    def rank(r):
        results[r] = sampling.fill_samples("rcg", setting_, cfg, split, cpu, ThreadDist(r, 2, sync))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0]["chunks"] == 1 and results[1] == {"rank": 1, "chunks": 1}
    a, b = open_samples(one.store), open_samples(split.store)
    assert np.array_equal(a.images[:], b.images[:]) and np.array_equal(a.reps[:], b.reps[:])
    assert not np.array_equal(a.reps[:2], a.reps[4:6])  # each chunk its own stream


def test_resume_after_a_kill(project, monkeypatch):
    params, _ = project
    path = params.paths.data / "samples" / "rcg.zarr"
    full = sample_stage.run(params, "rcg")
    images = open_samples(path).images[:]
    import shutil
    shutil.rmtree(path)
    real = sampling.SampleWriter.write
    calls = []

    def dying(self, chunk, *a, **k):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(chunk)
        real(self, chunk, *a, **k)

    monkeypatch.setattr(sampling.SampleWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_stage.run(params, "rcg")
    monkeypatch.setattr(sampling.SampleWriter, "write", real)
    resumed = sample_stage.run(params, "rcg")
    assert full["generated_now"] == 6 and resumed["generated_now"] == 2
    assert np.array_equal(open_samples(path).images[:], images)


# ------------------------------------------------------------------------------------------ editing
def test_canvas_masks_the_box_a_ring_and_the_padding():
    image = np.full((16, 16, 3), 9, np.uint8)
    c = make_canvas(image, (4, 4, 6, 6), factor=2)  # tokens 2..3 in each axis, plus a ring: 1..4
    assert c.offset == (0, 0) and (c.pixels == image).all()
    expect = np.zeros((8, 8), bool)
    expect[1:4, 1:4] = True
    assert (c.mask == expect).all()
    c = make_canvas(image, (12, 0, 19, 3), factor=2)  # past the right border by 3 px: shift by 2 tokens
    assert c.offset == (4, 0)
    assert (c.pixels[:, :12] == 9).all() and (c.pixels[:, 12:] == 0).all()
    assert c.mask[:, 6:].all()            # the zero padding is generated
    assert c.mask[:2, 3:].all() and not c.mask[3:, :5].any()  # box tokens (+ ring); far from it kept
    for box, msg in (((20, 0, 30, 4), "outside"), ((0, 0, 17, 4), "larger"), ((5, 0, 5, 4), "x0 < x1")):
        with pytest.raises(RcgError, match=msg):
            make_canvas(image, box, 2)


def test_edit_keeps_the_unmasked_tokens(files):
    cpu = torch.device("cpu")
    models = rcg.load_models(files["rep"], files["tokenizer"], None, cpu)
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = edit(models, image, (4, 4, 10, 10), torch.randn(DIM), 4, 6.0, 0.0, torch.Generator().manual_seed(0))
    keep = torch.from_numpy(~out.canvas.mask)
    assert torch.equal(out.tokens[keep], out.original[keep]) and not torch.equal(out.tokens, out.original)
    assert out.image.shape == (16, 16, 3) and out.image.dtype == np.uint8
    kept = ~out.canvas.mask.repeat(2, 0).repeat(2, 1)  # composited: the input's own pixels outside the tokens
    assert (out.image[kept] == image[kept]).all() and not (out.image[~kept] == image[~kept]).all()
    raw = edit(models, image, (4, 4, 10, 10), torch.randn(DIM), 4, 6.0, 0.0, torch.Generator().manual_seed(0),
               composite=False)
    assert not (raw.image[kept] == image[kept]).all()  # the VQGAN's reconstruction of the kept tokens
    with pytest.raises(RcgError, match="16-d"):
        edit(models, image, (4, 4, 10, 10), torch.randn(3), 4, 6.0, 0.0, torch.Generator())


# ---------------------------------------------------------------------------------------- bad input
def test_files_that_do_not_belong_together(files, tmp_path):
    cpu = torch.device("cpu")
    check = rcg.check_setting
    models = rcg.load_models(files["rep"], files["tokenizer"], files["rdm"], cpu)
    check("rcg", setting(), models)
    with pytest.raises(RcgError, match="'none' pixel generator"):
        check("baseline", setting(generator="none", reps=None), models)
    with pytest.raises(RcgError, match="exceeds the 64 tokens"):
        check("rcg", setting(iterations=65), models)
    with pytest.raises(RcgError, match="unconditional; it takes no class ids"):
        check("rcg", setting(classes=[1]), models)
    with pytest.raises(RcgError, match="reps store holds 8-d"):
        check("oracle", setting(reps="stored"), models, {"dim": 8, "encoder": ENCODER})
    with pytest.raises(RcgError, match="different encoders"):
        check("oracle", setting(reps="stored"), models, {"dim": DIM, "encoder": "f" * 64})
    other_tok = save_tokenizer(tmp_path / "tok2.pt", ch=32)
    with pytest.raises(RcgError, match="another tokenizer"):
        check("rcg", setting(), rcg.load_models(files["rep"], other_tok, files["rdm"], cpu))
    small = save_tokenizer(tmp_path / "tok3.pt", n_embed=16)
    with pytest.raises(RcgError, match="predicts 32 codes but the tokenizer has 16"):
        check("rcg", setting(), rcg.load_models(files["rep"], small, files["rdm"], cpu))
    rdm8 = save_rdm(tmp_path / "rdm8.pt", dim=8)
    with pytest.raises(RcgError, match="8-d reps but the pixel generator takes 16-d"):
        check("rcg", setting(), rcg.load_models(files["rep"], files["tokenizer"], rdm8, cpu))
    rdm_other = save_rdm(tmp_path / "rdm-other.pt", encoder="f" * 64)
    with pytest.raises(RcgError, match="different encoders"):
        check("rcg", setting(), rcg.load_models(files["rep"], files["tokenizer"], rdm_other, cpu))
    classy = rcg.load_models(files["rep"], files["tokenizer"], files["rdm_class"], cpu)
    with pytest.raises(RcgError, match="id 10 is unknown to the RDM"):
        check("rcg", setting(classes=[2, 10]), classy)
    labels = rcg.load_models(files["class"], files["tokenizer"], None, cpu)
    with pytest.raises(RcgError, match="id 12 is unknown to the class generator"):
        check("class", setting(generator="class", reps=None, classes=[12]), labels)
    none = rcg.load_models(files["none"], files["tokenizer"], None, cpu)
    with pytest.raises(RcgError, match="nothing to guide"):
        check("baseline", setting(generator="none", reps=None, guidance=1.0), none)


def test_stage_bad_input_before_sampling(project):
    params, _ = project
    with pytest.raises(RcgError, match="unknown sample setting 'nope'"):
        sample_stage.run(params, "nope")
    with pytest.raises(RcgError, match="run `rcg train-pixel cluster` first"):
        sample_stage.run(params, "cluster")
    bad = params.model_copy(deep=True)
    bad.sample.settings["rcg"].iterations = 100
    with pytest.raises(RcgError, match="iterations"):
        sample_stage.run(bad, "rcg")
    assert not (params.paths.data / "samples" / "rcg.zarr.partial").exists()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_offline_sample_and_edit(files, tmp_path):
    """``rcg sample SETTING --out`` on files given by path, and ``rcg edit`` with its own rep, in one process."""
    from typer.testing import CliRunner

    from pipeline.core.artifacts import weights_sha256
    from pipeline.core.config import dump_yaml
    from pipeline.models.encoder import MoCoViT
    from stages.cli import app

    torch.manual_seed(4)
    enc_kwargs = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, proj_hidden_dim=32, proj_dim=DIM)
    encoder = MoCoViT(**enc_kwargs)
    save_model_file(tmp_path / "encoder.pt", "rcg-encoder", {"model": enc_kwargs}, encoder.state_dict())
    enc_hash = weights_sha256(encoder.state_dict())
    pixel = save_pixel(tmp_path / "pixel-rep.pt", files["tokenizer"], encoder=enc_hash)
    rdm = save_rdm(tmp_path / "rdm.pt", encoder=enc_hash)
    params = tmp_path / "params.yaml"
    params.write_text(dump_yaml(micro_params(tmp_path, ["sample.num_samples=3", "sample.batch_size=2",
                                                        "sample.rdm.steps=10", "sample.figures.cell=16",
                                                        "sample.settings.rcg.iterations=3"])))
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "rcg", "--params", str(params), "--out", str(tmp_path / "out"),
                              "--pixel", str(pixel), "--tokenizer", str(files["tokenizer"]), "--rdm", str(rdm)])
    assert res.exit_code == 0, res.output
    assert len(open_samples(tmp_path / "out" / "rcg.zarr")) == 3
    assert (tmp_path / "out" / "figures" / "rcg" / "samples.png").is_file()
    res = runner.invoke(app, ["sample", "rcg", "--params", str(params), "--pixel", str(pixel)])
    assert res.exit_code == 2 and "offline mode" in res.output
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(image)
    common = ["--params", str(params), "--pixel", str(pixel), "--tokenizer", str(files["tokenizer"]),
              "--encoder", str(tmp_path / "encoder.pt"), "--iterations", "3"]
    res = runner.invoke(app, ["edit", str(image), "--box", "10,10,20,20", "--out", str(tmp_path / "e.png"), *common])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "e.png").size == (16, 16) and json.loads(res.stdout)["rep"] == "own"
    for extra, source in ((["--rep-from", str(image)], "other"), (["--rep-from-rdm", "--rdm", str(rdm)], "rdm")):
        res = runner.invoke(app, ["edit", str(image), "--box", "-4,0,8,8", "--out", str(tmp_path / "o.png"), *common,
                                  *extra])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["rep"] == source and json.loads(res.stdout)["offset"] == [-4, 0]
    for box, msg in (("1,2,3", "four integers"), ("30,30,40,40", "outside")):
        res = runner.invoke(app, ["edit", str(image), "--box", box, "--out", str(tmp_path / "f.png"), *common])
        assert res.exit_code == 2 and msg in res.output
    res = runner.invoke(app, ["edit", str(image), "--box", "0,0,4,4", "--out", str(tmp_path / "f.png"),
                              "--params", str(params), "--pixel", str(files["rep"]), "--tokenizer",
                              str(files["tokenizer"]), "--encoder", str(tmp_path / "encoder.pt")])
    assert res.exit_code == 2 and "another encoder" in res.output


def test_cli_offline_sample_uses_only_its_files_and_says_which_sampler(files, tmp_path, monkeypatch):
    """``rcg sample --out``: a params file naming data and checkpoints that do not exist (relative, from another
    folder) still samples, since only the files given are read; ``--preset`` applies the preset's sampler; without
    either (and no params.yaml here) the built-in defaults apply; the log says which settings and from where."""
    from typer.testing import CliRunner

    from pipeline.core.config import dump_yaml
    from stages.cli import app

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    params = tmp_path / "params.yaml"
    params.write_text(dump_yaml(micro_params(tmp_path, [
        "data.source=folder", "data.folder=imagenet/train", "encoder.checkpoint=pretrained/vitb.pth.tar",
        "tokenizer.checkpoint=pretrained/vqgan.ckpt", "sample.num_samples=2", "sample.batch_size=2",
        "sample.figures.cell=16", "sample.settings.rcg.iterations=3"])))
    model_files = ["--pixel", str(files["rep"]), "--tokenizer", str(files["tokenizer"]), "--rdm", str(files["rdm"])]
    small = ["--set", "sample.num_samples=2", "--set", "sample.batch_size=2", "--set", "runtime.device=cpu"]
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "rcg", "--params", str(params), "--out", str(tmp_path / "a"), *model_files])
    assert res.exit_code == 0, res.output
    assert ("sample rcg: MAGE 3 decoding steps at temperature 6, guidance 0; RDM DDIM 10 steps, eta 0, temperature "
            f"1; 2 samples, seed 0 (from params file {params})") in res.stderr
    res = runner.invoke(app, ["sample", "rcg", "--preset", "imagenet256_vitb", "--out", str(tmp_path / "b"),
                              *model_files, *small])
    assert res.exit_code == 0, res.output
    assert ("MAGE 20 decoding steps at temperature 6, guidance 0; RDM DDIM 250 steps, eta 1, temperature 1; "
            "2 samples, seed 0 (from preset imagenet256_vitb + --set sample.num_samples=2") in res.stderr
    assert open_samples(tmp_path / "b" / "rcg.zarr").attrs["settings"]["iterations"] == 20
    res = runner.invoke(app, ["sample", "rcg", "--out", str(tmp_path / "c"), *model_files, *small])
    assert res.exit_code == 0, res.output
    assert "MAGE 10 decoding steps" in res.stderr and "RDM DDIM 100 steps, eta 0" in res.stderr
    assert "from the built-in defaults" in res.stderr and "--preset imagenet256_vitb" in res.stderr
    res = runner.invoke(app, ["sample", "rcg", "--preset", "imagenet256_vitb", "--params", str(params), "--out",
                              str(tmp_path / "d"), *model_files])
    assert res.exit_code == 2 and "--preset and --params both give the settings" in res.output
    res = runner.invoke(app, ["sample", "rcg", "--preset", "imagenet256_vitb"])
    assert res.exit_code == 2 and "offline mode: add --out DIR" in res.output


def test_official_mage_file_samples_and_its_vqgan_is_checked(files, tmp_path):
    """An official-layout rep-conditioned MAGE (MAGE-small widths: heads inferred) embedding our tokenizer."""
    import argparse

    from pipeline.core.config import RdmSample
    from pipeline.models.official.mage import official_unused_shapes
    import pipeline.models.vqgan  # noqa: F401  (registers the "tokenizer" model kind)
    torch.manual_seed(5)
    kwargs = dict(codebook_size=CODES, seq_len=64, rep_dim=DIM, vocab="official", embed_dim=128, depth=1,
                  num_heads=4, decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4)
    model = MAGE(**kwargs)
    sd = dict(model.state_dict())
    sd.update({k: torch.randn(s) for k, s in official_unused_shapes(kwargs).items()})
    sd.update({f"vqgan.{k}": v for k, v in load_model("tokenizer", files["tokenizer"])[0].state_dict().items()})
    sd["pretrained_encoder.cls_token"] = torch.zeros(1, 1, 4)
    path = tmp_path / "mage-official.pth"
    torch.save({"model": sd, "model_ema": None, "args": argparse.Namespace(temp=6.0)}, path)
    models = rcg.load_models(path, files["tokenizer"], None, torch.device("cpu"))
    s = setting(reps="stored")
    store = {"dim": DIM, "encoder": None}
    rcg.check_setting("oracle", s, models, store)
    assert models.pixel.grid == (8, 8) and models.pixel.tokenizer_weights is not None
    out = rcg.generate(models, s, RdmSample(), 2, torch.Generator().manual_seed(0), reps=torch.randn(2, DIM))
    assert out.tokens.max() < CODES and out.images.shape == (2, 16, 16, 3)
    other = rcg.load_models(path, save_tokenizer(tmp_path / "tok-other.pt", ch=32), None, torch.device("cpu"))
    with pytest.raises(RcgError, match="embeds another VQGAN"):
        rcg.check_setting("oracle", s, other, store)


def test_official_unconditional_mage_file_samples_as_the_baseline(files, tmp_path):
    """LTH14/mage's unconditional file (no rep slot, no encoder) samples offline as the baseline generator."""
    from official_files import uncond_mage_file
    from pipeline.core.config import RdmSample
    import pipeline.models.vqgan  # noqa: F401  (registers the "tokenizer" model kind)
    torch.manual_seed(7)
    mage = MAGE(codebook_size=CODES, seq_len=64, rep_dim=DIM, vocab="official", embed_dim=128, depth=1, num_heads=4,
                decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4, conditioning="none")  # heads inferred
    vqgan_state = load_model("tokenizer", files["tokenizer"])[0].state_dict()
    path = uncond_mage_file(tmp_path / "mage-uncond.pth", mage, vqgan_state)
    models = rcg.load_models(path, files["tokenizer"], None, torch.device("cpu"))
    assert models.pixel.conditioning == "none" and models.pixel.encoder is None
    s = setting(generator="none", reps=None)
    rcg.check_setting("baseline", s, models, {"dim": DIM, "encoder": None})
    out = rcg.generate(models, s, RdmSample(), 2, torch.Generator().manual_seed(0))
    assert out.tokens.max() < CODES and out.images.shape == (2, 16, 16, 3)


def test_official_rdm_and_raw_vqgan_files_load(files, tmp_path):
    """Offline sampling reads an official-layout RDM (EMA shadows used) and a raw VQGAN state dict."""
    import argparse

    from pipeline.core.config import RdmSample
    from pipeline.models.official.rdm import ema_shadow_name
    import pipeline.models.vqgan  # noqa: F401  (registers the "tokenizer" model kind)
    torch.manual_seed(6)
    rdm = RDM(in_channels=DIM, time_embed_dim=16, model_channels=32, bottleneck_channels=32, out_channels=DIM,
              num_res_blocks=2, embed_dim=16)
    ema = {n: torch.randn_like(p) for n, p in rdm.net.named_parameters()}
    sd = {**{f"model.diffusion_model.{k}": v for k, v in rdm.net.state_dict().items()},
          **{ema_shadow_name(n): v for n, v in ema.items()},
          "cond_stage_model.embedding.weight": rdm.cond_stage_model.embedding.weight.detach()}
    torch.save({"model": sd, "args": argparse.Namespace(x=1)}, tmp_path / "rdm-official.pth")
    torch.save(load_model("tokenizer", files["tokenizer"])[0].state_dict(), tmp_path / "vqgan.ckpt")
    models = rcg.load_models(files["rep"], tmp_path / "vqgan.ckpt", tmp_path / "rdm-official.pth", torch.device("cpu"))
    assert all(torch.equal(p, ema[n]) for n, p in models.rdm.model.net.named_parameters())
    assert models.rdm.encoder is None and not models.rdm.model.whitening.is_active
    out = rcg.generate(models, setting(), RdmSample(steps=10), 2, torch.Generator().manual_seed(0))
    assert out.reps.shape == (2, DIM) and out.images.shape == (2, 16, 16, 3)


def test_class_conditional_rcg_stage(project, files):
    """A class-conditional RDM through the same rep generator: the store holds the reps and the class ids."""
    import shutil
    params, _ = project
    shutil.copy(files["rdm_class"], params.paths.models / "rdm.pt")
    summary = sample_stage.run(params, "rcg")
    s = open_samples(params.paths.data / "samples" / "rcg.zarr")
    assert s.reps.shape == (6, DIM) and s.labels[:].tolist() == [0, 1, 2, 3, 4, 5]
    assert "classes.png" in {p.rsplit("/", 1)[1] for p in summary["figures"]}
    bad = params.model_copy(deep=True)
    bad.sample.settings["rcg"].classes = [3, 10]
    with pytest.raises(RcgError, match="id 10 is unknown to the RDM"):
        sample_stage.run(bad, "rcg")
