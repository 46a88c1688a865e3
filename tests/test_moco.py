import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.models.encoder import MoCoViT, build_encoder
from pipeline.models.official.mocov3 import VIT_SIZES
from pipeline.models.moco import MoCoV3, contrastive_loss, momentum_at
from pipeline.data.augment import TwoCropAugment

MANIFEST = Path("/work/shared/reference/manifests/mocov3_vitb_pth_tar.json")


TINY_RESNET = dict(arch="resnet", img_size=16, proj_hidden_dim=64, proj_dim=16,
                   resnet=dict(block="basic", layers=[1, 1], width=8, stem="conv3x3", stem_stride=2))


def tiny_moco(seed: int = 0, arch: str = "vit", **kw) -> MoCoV3:
    torch.manual_seed(seed)
    base = (MoCoViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4, proj_hidden_dim=64, proj_dim=16)
            if arch == "vit" else build_encoder(TINY_RESNET))
    return MoCoV3(base, dim=16, mlp_dim=64, T=0.2, **kw)


@pytest.mark.skipif(not MANIFEST.is_file(), reason="reference manifest not available")
def test_full_moco_matches_official_state_dict():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = MoCoV3(MoCoViT(**VIT_SIZES["base"]))
    own = {f"module.{k}": list(v.shape) for k, v in model.state_dict().items()}
    assert list(own) == list(manifest) and own == manifest


def test_momentum_schedule():
    assert momentum_at(0.0) == pytest.approx(0.99)
    assert momentum_at(1.0) == pytest.approx(1.0)
    assert momentum_at(0.5, base_m=0.9) == pytest.approx(0.95)


def test_momentum_update():
    model = tiny_moco()
    base, mom = model.base_encoder, model.momentum_encoder
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), mom.parameters()))
    assert not any(p.requires_grad for p in mom.parameters())
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mom.parameters()]
    model.update_momentum_encoder(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, mom.parameters()))
    model.update_momentum_encoder(0.5)
    assert all(torch.allclose(m, (a + b) / 2) for m, a, b in zip(mom.parameters(), before, base.parameters()))
    model.update_momentum_encoder(0.0)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), mom.parameters()))


def test_contrastive_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    q = torch.randn(16, 8)
    aligned = contrastive_loss(q, q * 2, T=0.2)
    random = contrastive_loss(q, torch.randn(16, 8), T=0.2)
    assert aligned < random
    # uniform logits give CE = log(N), scaled by 2T
    assert contrastive_loss(torch.ones(4, 8), torch.ones(4, 8), T=0.5) == pytest.approx(math.log(4))


def test_gradients_reach_base_and_predictor_only():
    model = tiny_moco().train()
    x1, x2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    model(x1, x2, m=0.99).backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is None for p in model.base_encoder.patch_embed.parameters())  # stop-grad conv1
    assert model.base_encoder.pos_embed.grad is None
    trainable = [p for p in model.base_encoder.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert model.base_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())
    unfrozen = tiny_moco(stop_grad_conv1=False)
    unfrozen(x1, x2, m=0.99).backward()
    assert unfrozen.base_encoder.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_sgd_steps_reduce_loss(arch):
    model = tiny_moco(arch=arch).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 16, 16, generator=g), torch.rand(8, 3, 16, 16, generator=g)) for _ in range(2)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    def total() -> float:
        with torch.no_grad():
            return sum(model(x1, x2, m=1.0).item() for x1, x2 in batches)

    start = total()
    for _ in range(10):
        for x1, x2 in batches:
            opt.zero_grad()
            model(x1, x2, m=0.99).backward()
            opt.step()
    assert total() < 0.9 * start


def test_two_crop_augment():
    import numpy as np
    from PIL import Image
    aug = TwoCropAugment(32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    c1, c2 = aug.crops(img, np.random.default_rng(1))
    assert c1.shape == c2.shape == (3, 32, 32) and c1.dtype == torch.uint8 and not torch.equal(c1, c2)
    again = aug.crops(img, np.random.default_rng(1))
    assert torch.equal(again[0], c1) and torch.equal(again[1], c2)  # a pure function of the stream
    crops = torch.stack([c1, c2, c1])
    v1, v2 = aug.views(crops, crops, torch.Generator().manual_seed(0))
    for v in (v1, v2):
        assert type(v) is torch.Tensor and v.shape == (3, 3, 32, 32) and v.dtype == torch.float32
        assert v.min() >= 0 and v.max() <= 1
    assert not torch.equal(v1, v2) and not torch.equal(v1[0], v1[2])  # per-sample parameters
    w1, _ = aug.views(crops, crops, torch.Generator().manual_seed(0))
    assert torch.equal(v1, w1)


def test_hsv_round_trip_and_blur():
    from pipeline.data.augment import gaussian_blur, hsv_to_rgb, rgb_to_hsv
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(hsv_to_rgb(*rgb_to_hsv(x)), x, atol=1e-5)
    h, s, v = rgb_to_hsv(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))  # red: hue 0; green is a third turn on
    assert torch.allclose(hsv_to_rgb(h + 1 / 3, s, v).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 3, torch.tensor([0.5, 2.0])), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 5, 5)
    spike[..., 2, 2] = 1
    blurred = gaussian_blur(spike, 3, torch.tensor([1.0]))
    assert abs(blurred.sum() - 1) < 1e-5 and blurred[0, 0, 2, 2] < 1 and blurred[0, 0, 1, 2] > 0


def test_two_crop_augment_colour_knobs():
    """grayscale=1 makes every view grey; hue=0.5 turns a red image green in some views, hue 0.1 in none."""
    img = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    img[:, 0] = 230
    grey = TwoCropAugment(32, crop_min=1.0, grayscale=1.0)
    for v in grey.views(img, img, torch.Generator().manual_seed(0)):
        assert torch.allclose(v[:, 0], v[:, 1]) and torch.allclose(v[:, 1], v[:, 2])
    for hue, turns_green in ((0.5, True), (0.1, False)):
        aug = TwoCropAugment(32, crop_min=1.0, hue=hue, grayscale=0.0)
        v1, _ = aug.views(img, img, torch.Generator().manual_seed(0))  # view 1 never solarizes
        dominant = set(v1.mean(dim=(2, 3)).argmax(1).tolist())
        assert (1 in dominant) == turns_green
