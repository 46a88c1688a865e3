"""LTH14/mage's unconditional MAGE imported as the ``none`` generator (pixel.checkpoints.none), the renamed
``pixel.checkpoint``, and the curve CSV an import writes."""

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch

from official_files import mocov3_file, rep_mage_file, uncond_mage_file
from pipeline.core.artifacts import load_checkpoint, load_model
from pipeline.core.errors import RcgError
from pipeline.models.mage import MAGE, MAGE_SIZES
from pipeline.models.official.mage import REP_SLOT, convert_official_mage, load_official_mage, official_unused_shapes
from pipeline.models.vqgan import VQGAN
from stages import train_pixel
from test_train_pixel import ENCODER, OFFICIAL, VQ, D, H, K, W, params_for, stores_with_a_tokenizer
from conftest import micro_params

MANIFEST = Path("/work/shared/reference/manifests/mage_b_repcond.json")
ARCH = dict(vocab="official", embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2)


def source(conditioning: str = "none", seed: int = 0) -> MAGE:
    """A micro MAGE in the official vocabulary, every parameter moved off its init (LayerNorms included)."""
    torch.manual_seed(seed)
    model = MAGE(codebook_size=K, seq_len=H * W, rep_dim=D, conditioning=conditioning, **ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def official_unconditional_logits(m: MAGE, ids: torch.Tensor) -> torch.Tensor:
    """The generation forward of LTH14/mage (gen_img_uncond.py) on ``m``'s weights: position 0 is the class id
    1100 through ``token_emb`` (no rep slot), every position is encoded, and the decoder fills masked positions
    with the decoded position 0. Codebook logits [B, L, K]."""
    b = len(ids)
    x = m.token_emb(torch.cat([ids.new_full((b, 1), m.slot_id), ids], 1))
    for block in m.blocks:
        x = block(x)
    x = m.decoder_embed(m.norm(x))
    masked = torch.cat([torch.zeros(b, 1, dtype=torch.bool), ids == m.mask_id], 1)
    x = torch.where(masked[..., None], x[:, :1].expand_as(x), x) + m.decoder_pos_embed_learned
    for block in m.decoder_blocks:
        x = block(x)
    return m.mlm_layer(m.decoder_norm(x), m.token_emb.word_embeddings.weight, m.codebook_size)[:, 1:]


def masked_ids(model: MAGE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(K, (3, H * W), generator=g)
    return ids.masked_fill(torch.rand(3, H * W, generator=g) < 0.6, model.mask_id)


@pytest.mark.skipif(not MANIFEST.exists(), reason="reference manifest not available")
def test_mage_b_unconditional_layout_has_every_key_accounted_for():
    """models_mage.py's MAGE-B: RCG's manifest less the rep slot and the encoder, which that file does not have."""
    manifest = json.loads(MANIFEST.read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()
          if k not in REP_SLOT and not k.startswith("pretrained_encoder.")}
    config, ours, encoder, vqgan = convert_official_mage(sd, rep_dim=256)
    assert {k: config[k] for k in MAGE_SIZES["mage_base"]} == MAGE_SIZES["mage_base"]
    assert (config["conditioning"], config["codebook_size"], config["seq_len"]) == ("none", 1024, 256)
    with torch.device("meta"):
        expected = MAGE(**config).state_dict()
    assert set(ours) == set(expected) and all(ours[k].shape == expected[k].shape for k in expected)
    assert not encoder and len(vqgan) == 168
    assert len(ours) - len(REP_SLOT) + len(official_unused_shapes(config)) + len(vqgan) == len(sd) == 602 - 169
    with pytest.raises(RcgError, match="no rep slot: give the rep size"):
        convert_official_mage(sd)


def test_unconditional_file_round_trip(tmp_path):
    """Imported, the none generator computes the official unconditional forward, whatever slot it is given."""
    src = source()
    vqgan = VQGAN(**VQ).state_dict()
    path = uncond_mage_file(tmp_path / "mage-vitb.pth", src, vqgan)
    model, config, encoder, embedded = load_official_mage(path, rep_dim=D, num_heads=2, decoder_num_heads=2)
    assert not model.training and config["conditioning"] == "none" and not encoder
    assert all(torch.equal(embedded[k], v) for k, v in vqgan.items())
    ids = masked_ids(model)
    want = official_unconditional_logits(src, ids)
    torch.testing.assert_close(model(ids, model.condition(batch=3)), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(src(ids, src.condition(batch=3)), want, atol=1e-3)  # the rep slot would differ


def test_stage_imports_the_unconditional_mage(tmp_path):
    """train_pixel@none with pixel.checkpoints.none: checked against the token store's tokenizer (weights), saved
    as pixel-none.pt computing the official forward, evaluated, and its curve CSV is a header alone."""
    vqgan, _ = stores_with_a_tokenizer(tmp_path)
    src = source()
    path = uncond_mage_file(tmp_path / "mage-vitb.pth", src, vqgan.state_dict())
    params = params_for(tmp_path, f"pixel.checkpoints.none={path}", extra={"model": OFFICIAL})
    summary = train_pixel.run(params, "none")
    assert (summary["source"], summary["vqgan_check"]) == ("official", "weights") and "encoder_check" not in summary
    assert not (params.paths.state / "train_pixel-none.pt").exists()  # nothing trained
    model, payload = load_model("pixel", params.paths.models / "pixel-none.pt")
    assert payload["summary"]["checkpoint"] == str(path) and model.conditioning == "none"
    ids = masked_ids(model, seed=1)
    torch.testing.assert_close(model(ids, model.condition(batch=3)), official_unconditional_logits(src, ids),
                               rtol=1e-5, atol=1e-5)
    with open(params.paths.plots / "train_pixel-none.csv") as f:
        assert list(csv.reader(f)) == [["step"]]
    metrics = json.loads((params.paths.metrics / "pixel-none.json").read_text())
    assert metrics["source"] == "official" and 0 <= metrics["val_accuracy"] <= 1


def test_wrong_files_are_refused_in_one_line(tmp_path):
    vqgan, _ = stores_with_a_tokenizer(tmp_path)
    uncond = uncond_mage_file(tmp_path / "uncond.pth", source(), vqgan.state_dict())
    rep = rep_mage_file(tmp_path / "rep.pth", source("rep"), ENCODER.state_dict(), vqgan.state_dict())
    torch.manual_seed(9)
    cases = {
        ("none", rep): r"pixel.checkpoints.none: .*rep.pth is RCG's rep-conditioned MAGE .*set it as "
                       r"pixel.checkpoints.rep",
        ("rep", uncond): r"pixel.checkpoints.rep: .*uncond.pth is an unconditional MAGE .*set it as "
                         r"pixel.checkpoints.none",
        ("none", uncond_mage_file(tmp_path / "other-vq.pth", source(), VQGAN(**VQ).state_dict())):
            "another tokenizer .*same architecture, different weights",
        ("none", uncond_mage_file(tmp_path / "deeper.pth", MAGE(codebook_size=K, seq_len=H * W, rep_dim=D,
                                                                conditioning="none", **{**ARCH, "depth": 2}),
                                  vqgan.state_dict())):
            r"pixel.checkpoints.none .*deeper.pth does not match pixel.model and the stores: depth 1 \(file: 2\)",
        ("none", mocov3_file(tmp_path / "moco.pth.tar", ENCODER)): "moco.pth.tar is not an official MAGE checkpoint",
    }
    with_encoder = load_checkpoint(uncond, safe_globals=(argparse.Namespace,))
    with_encoder["model"]["pretrained_encoder.cls_token"] = torch.zeros(1, 1, 4)
    torch.save(with_encoder, tmp_path / "with-encoder.pth")
    cases["none", tmp_path / "with-encoder.pth"] = "embeds an encoder .*but has no rep slot"
    for (conditioning, path), message in cases.items():
        params = params_for(tmp_path, f"pixel.checkpoints.{conditioning}={path}",
                            extra={"model": OFFICIAL})
        with pytest.raises(RcgError, match=message) as err:
            train_pixel.run(params, conditioning)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "models" / "pixel-none.pt").exists()


def test_pixel_checkpoint_is_renamed_and_only_rep_and_none_import(tmp_path):
    with pytest.raises(RcgError, match=r"pixel.checkpoint: renamed to pixel.checkpoints.rep"):
        micro_params(tmp_path, ["pixel.checkpoint=mage.pth"])
    with pytest.raises(RcgError, match=r"pixel.checkpoints.class: no official file exists"):
        micro_params(tmp_path, ["pixel.checkpoints.class=mage.pth"])
    params = micro_params(tmp_path, ["pixel.checkpoints.none=mage.pth"])
    assert params.pixel.checkpoints == {"rep": None, "none": Path("mage.pth"), "class": None, "cluster": None}
