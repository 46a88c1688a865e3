"""MoCo v3's ResNet backbone (``encoder.model.arch: resnet``): torchvision's layout (so official files load), the
MoCo v3 ResNet recipe, and the stages that train, import and encode with it."""

import json

import pytest
import torch
import torchvision

from conftest import micro_params
from pipeline.core.artifacts import load_model
from pipeline.core.config import validate
from pipeline.core.errors import RcgError
from pipeline.data.stores import open_store
from pipeline.models.encoder import MoCoViT, build_encoder, represent
from pipeline.models.moco import MoCoV3
from pipeline.models.official.encoder import load_encoder, load_encoder_as
from pipeline.models.official.mocov3 import check_official_encoder, infer_resnet_config
from pipeline.models.resnet import MoCoResNet
from stages import encode, pretrain_encoder

R50 = dict(block="bottleneck", layers=[3, 4, 6, 3], width=64, stem="imagenet", stem_stride=1)
R18 = dict(block="basic", layers=[2, 2, 2, 2], width=64, stem="imagenet", stem_stride=1)
TINY = dict(block="basic", layers=[1, 1], width=8, stem="conv3x3", stem_stride=2)
MICRO_RESNET = ["encoder.model.arch=resnet", "encoder.model.resnet.width=8", "encoder.model.resnet.layers=[1,1]"]


def resnet_config(resnet: dict, img_size: int = 16, hidden: int = 32, dim: int = 16) -> dict:
    return dict(arch="resnet", img_size=img_size, proj_hidden_dim=hidden, proj_dim=dim, resnet=resnet)


def official_resnet_file(path, encoder: MoCoResNet) -> None:
    """A DDP-wrapped MoCo_ResNet file: base encoder, a momentum encoder one off from it, a predictor."""
    state = encoder.state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in state.items()}
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()})
    sd.update({"module.predictor.0.weight": torch.randn(32, 16), "module.predictor.3.weight": torch.randn(16, 32)})
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": None}, path)


@pytest.mark.parametrize("resnet, reference", [(R18, torchvision.models.resnet18), (R50, torchvision.models.resnet50)])
def test_layout_and_features_are_torchvisions(resnet, reference):
    """Keys, shapes and the pooled feature of torchvision's ResNet-18/50, with MoCo v3's projector as ``fc``."""
    torch.manual_seed(0)
    ours = build_encoder(resnet_config(resnet, img_size=224, hidden=4096, dim=256)).eval()
    theirs = reference().eval()
    body = {k: v for k, v in ours.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in body.items()} == \
           {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert [k for k in ours.state_dict() if k.startswith("fc.")] == [
        "fc.0.weight", "fc.1.weight", "fc.1.bias", "fc.1.running_mean", "fc.1.running_var", "fc.1.num_batches_tracked",
        "fc.3.weight", "fc.4.running_mean", "fc.4.running_var", "fc.4.num_batches_tracked"]  # MoCo v3's 2-layer MLP
    assert ours.fc[0].in_features == theirs.fc.in_features and ours.fc[3].out_features == 256
    theirs.load_state_dict({**body, "fc.weight": theirs.fc.weight, "fc.bias": theirs.fc.bias})
    theirs.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.features(x), theirs(x), atol=1e-5)


def test_blocks_start_as_the_identity():
    """MoCo v3 builds its ResNets with zero_init_residual: every residual branch's last BN starts at zero."""
    model = build_encoder(resnet_config(R50, img_size=224))
    last = [m.bn3 for m in model.modules() if hasattr(m, "bn3")]
    assert len(last) == 16 and all(torch.count_nonzero(bn.weight) == 0 for bn in last)


def test_moco_resnet_recipe():
    """No frozen stem (that is the ViT's trick) and no last BN on the predictor (MoCo_ResNet)."""
    torch.manual_seed(0)
    model = MoCoV3(build_encoder(resnet_config(TINY)), dim=16, mlp_dim=32).train()
    assert isinstance(model.predictor[-1], torch.nn.Linear)
    vit = MoCoV3(MoCoViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, proj_hidden_dim=32,
                         proj_dim=16), dim=16, mlp_dim=32)
    assert isinstance(vit.predictor[-1], torch.nn.BatchNorm1d)
    model(torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), m=0.99).backward()
    assert model.base_encoder.conv1.weight.grad is not None and model.base_encoder.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.momentum_encoder.parameters())  # it learns: test_moco's SGD test


def test_official_resnet_file_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_encoder(resnet_config(TINY)).eval()
    for m in source.fc:  # non-trivial running stats, so eval-mode BN is exercised
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
    path = tmp_path / "r50.pth.tar"
    official_resnet_file(path, source)
    read = infer_resnet_config(torch.load(path, weights_only=True)["state_dict"], img_size=16)
    assert read == resnet_config({**TINY, "stem_stride": 1})  # the stem's stride is not in the weights
    x = torch.rand(3, 3, 16, 16)
    imported = load_encoder_as(path, resnet_config(TINY))
    assert not imported.training and torch.equal(represent(imported, x), represent(source, x))
    auto = load_encoder(path)  # shape from the file; a ResNet file says nothing of its input size: 224
    assert isinstance(auto, MoCoResNet) and auto.input_size == 224
    with pytest.raises(RcgError) as err:
        load_encoder_as(path, resnet_config({**TINY, "width": 16}))
    msg = str(err.value)
    assert "another architecture than encoder.model: the file has resnet.width 8 (params: 16)" in msg
    assert "shape mismatches (conv1.weight [8, 3, 3, 3] vs model [16, 3, 3, 3]" in msg
    with pytest.raises(RcgError, match="the file has arch resnet \\(params: vit\\)"):
        load_encoder_as(path, dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                   proj_hidden_dim=32, proj_dim=16))


def test_config_checks_the_vit_fields_only_for_a_vit(tmp_path):
    tree = {"encoder": {"model": {"arch": "resnet", "img_size": 30, "patch_size": 8}}}
    assert validate(tree).encoder.model.arch == "resnet"
    with pytest.raises(RcgError, match="must be a multiple of patch_size"):
        validate({"encoder": {"model": {"arch": "vit", "img_size": 30, "patch_size": 8}}})
    with pytest.raises(RcgError, match="encoder.model.resnet.block"):
        validate({"encoder": {"model": {"arch": "resnet", "resnet": {"block": "wide"}}}})
    with pytest.raises(RcgError, match="encoder.model.arch"):
        validate({"encoder": {"model": {"arch": "convnext"}}})


def test_files_from_before_arch_are_vits():
    old = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0, proj_hidden_dim=32,
               proj_dim=16)
    assert isinstance(build_encoder(old), MoCoViT)


def test_pretrain_and_encode_with_a_resnet(workspace):
    params = micro_params(workspace, MICRO_RESNET)
    summary = pretrain_encoder.run(params)
    assert summary["source"] == "pretrained" and summary["steps"] == 6
    model, payload = load_model("encoder", params.paths.models / "encoder.pt")
    assert isinstance(model, MoCoResNet) and payload["config"]["model"]["resnet"]["width"] == 8
    torch.manual_seed(params.seed)
    init = build_encoder(params.encoder.model.model_dump())
    assert not torch.equal(model.state_dict()["conv1.weight"], init.state_dict()["conv1.weight"])  # not frozen
    encode.run(params)
    store = open_store(params.paths.reps, "reps")
    assert store["reps"].shape == (48, params.views.count, 16)
    assert store.attrs["identity"]["encoder"]["config"]["model"]["arch"] == "resnet"
    knn = json.loads((params.paths.metrics / "encoder.json").read_text())
    assert 0 <= knn["knn_top1_random_init"] <= 1 and 0 <= knn["knn_top1"] <= 1


def test_official_rdm_refuses_reps_of_a_resnet(tmp_path):
    vit = MoCoViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, proj_hidden_dim=32, proj_dim=16)
    identity = {"encoder": {"config": {"model": resnet_config(TINY)}, "weights_sha256": "0"}}
    with pytest.raises(RcgError, match="trained on a MoCo v3 ViT's reps, but reps.zarr was encoded with a resnet"):
        check_official_encoder(vit.state_dict(), identity, "reps.zarr", tmp_path / "rdm.pth")
