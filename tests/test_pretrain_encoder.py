import csv
import shutil

import pytest
import torch

from conftest import micro_params
from official_files import mocov3_file
from pipeline.core.artifacts import file_sha256, load_model, load_model_file
from pipeline.models.encoder import MODEL_FORMAT, build_encoder, represent
from pipeline.core.errors import RcgError
from pipeline.models.moco import MoCoV3
from pipeline.train.state import TrainState
from stages import pretrain_encoder



def curve(params) -> list[dict]:
    with open(params.paths.plots / "pretrain_encoder.csv") as f:
        return list(csv.DictReader(f))


def test_pretrain_writes_a_loadable_encoder(workspace):
    params = micro_params(workspace, ["encoder.train.log_every=1"])
    summary = pretrain_encoder.run(params)
    assert summary["source"] == "pretrained" and summary["steps"] == 6  # 48 images / 16 = 3 steps x 2 epochs
    model, payload = load_model("encoder", params.paths.models / "encoder.pt")
    assert payload["config"] == {"model": params.encoder.model.model_dump()}
    assert payload["summary"]["epochs"] == 2 and payload["summary"]["final_loss"] > 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.manual_seed(params.seed)
    init = build_encoder(params.encoder.model.model_dump())  # the first draw of the seeded run
    trained, start = model.state_dict(), init.state_dict()
    assert torch.equal(trained["patch_embed.proj.weight"], start["patch_embed.proj.weight"])  # frozen (MoCo v3)
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert not torch.equal(trained["head.1.running_mean"], start["head.1.running_mean"])
    assert represent(model, torch.rand(2, 3, 16, 16)).shape == (2, 16)
    rows = curve(params)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    lr, m = [float(r["lr"]) for r in rows], [float(r["m"]) for r in rows]
    assert lr[0] == 0.0 and max(lr) == lr[3] == pytest.approx(params.encoder.train.blr * 16 / 256)  # warm-up 3 steps, then cosine
    assert m[0] == params.encoder.train.momentum and m == sorted(m) and m[-1] < 1


def test_resume_after_kill_is_exact(workspace, monkeypatch):
    params = micro_params(workspace)
    pretrain_encoder.run(params)
    uninterrupted = load_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT)["state_dict"]
    full_curve = curve(params)

    other = workspace / "killed"
    shutil.copytree(workspace / "data" / "shards", other / "data" / "shards")
    params = micro_params(other)
    real_save = TrainState.save

    def save_then_die(self, step, modules, extra=None):
        real_save(self, step, modules, extra)
        raise KeyboardInterrupt("simulated kill after the first epoch's checkpoint")

    monkeypatch.setattr(TrainState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_encoder.run(params)
    monkeypatch.undo()
    assert not (params.paths.models / "encoder.pt").exists()
    assert torch.load(params.paths.state / "pretrain_encoder.pt", weights_only=True)["step"] == 3

    steps = []
    real_forward = MoCoV3.forward
    monkeypatch.setattr(MoCoV3, "forward", lambda self, *a: steps.append(1) or real_forward(self, *a))
    summary = pretrain_encoder.run(params)  # resumes at step 3 (epoch 1) of the same config
    assert len(steps) == 3
    resumed = load_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT)["state_dict"]
    assert list(resumed) == list(uninterrupted)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert curve(params) == full_curve and summary["steps"] == 6


def test_state_from_another_config_is_not_resumed(workspace):
    params = micro_params(workspace)
    pretrain_encoder.run(params)
    other = micro_params(workspace, ["encoder.train.temperature=0.5"])
    fresh = micro_params(workspace / "fresh", ["encoder.train.temperature=0.5"])
    shutil.copytree(workspace / "data" / "shards", workspace / "fresh" / "data" / "shards")
    pretrain_encoder.run(other)
    pretrain_encoder.run(fresh)
    a = load_model_file(other.paths.models / "encoder.pt", MODEL_FORMAT)["state_dict"]
    b = load_model_file(fresh.paths.models / "encoder.pt", MODEL_FORMAT)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_official_import_writes_the_same_format(workspace):
    params = micro_params(workspace)
    pretrain_encoder.run(params)
    pretrained = load_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT)

    torch.manual_seed(3)
    source = build_encoder(params.encoder.model.model_dump())
    ckpt = workspace / "vit-small.pth.tar"
    mocov3_file(ckpt, source)
    params = micro_params(workspace, [f"encoder.checkpoint={ckpt}"])
    summary = pretrain_encoder.run(params)
    imported = load_model_file(params.paths.models / "encoder.pt", MODEL_FORMAT)
    assert summary["source"] == "official" and summary["checkpoint_sha256"] == file_sha256(ckpt)
    assert imported["summary"] == {"source": "official", "checkpoint": str(ckpt),
                                   "checkpoint_sha256": file_sha256(ckpt)}
    assert set(imported) == set(pretrained) and imported["config"] == pretrained["config"]
    assert {k: v.shape for k, v in imported["state_dict"].items()} == \
           {k: v.shape for k, v in pretrained["state_dict"].items()}
    assert all(torch.equal(imported["state_dict"][k], v) for k, v in source.state_dict().items())


def test_wrong_architecture_checkpoint_names_fields_keys_and_shapes(workspace):
    params = micro_params(workspace)
    wrong = build_encoder({**params.encoder.model.model_dump(), "depth": 2, "img_size": 32})
    ckpt = workspace / "wrong.pth.tar"
    mocov3_file(ckpt, wrong)
    with pytest.raises(RcgError) as err:
        pretrain_encoder.run(micro_params(workspace, [f"encoder.checkpoint={ckpt}"]))
    msg = str(err.value)
    assert "img_size 32 (params: 16)" in msg and "depth 2 (params: 1)" in msg
    assert "unexpected keys (blocks.1." in msg and "pos_embed [1, 65, 32] vs model [1, 17, 32]" in msg
    assert not (params.paths.models / "encoder.pt").exists()


def test_bad_input(workspace):
    with pytest.raises(RcgError, match="encoder.checkpoint: file does not exist: .*missing.pth"):
        pretrain_encoder.run(micro_params(workspace, [f"encoder.checkpoint={workspace / 'missing.pth'}"]))
    not_moco = workspace / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, not_moco)
    with pytest.raises(RcgError, match="does not match the encoder architecture: .*missing keys"):
        pretrain_encoder.run(micro_params(workspace, [f"encoder.checkpoint={not_moco}"]))
    with pytest.raises(RcgError, match="encoder.train.batch_size \\(64\\) exceeds the 48 training images"):
        pretrain_encoder.run(micro_params(workspace, ["encoder.train.batch_size=64"]))


def test_augmentations_do_not_depend_on_the_loader_workers(workspace):
    """Each item's augmentations come from its own seeded stream (seed, global position): workers change nothing."""
    pretrain_encoder.run(micro_params(workspace))
    other = workspace / "workers"
    shutil.copytree(workspace / "data" / "shards", other / "data" / "shards")
    pretrain_encoder.run(micro_params(other, ["encoder.train.workers=2"]))
    a = load_model_file(workspace / "data" / "models" / "encoder.pt", MODEL_FORMAT)["state_dict"]
    b = load_model_file(other / "data" / "models" / "encoder.pt", MODEL_FORMAT)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
