"""The real `dvc repro` on the micro preset with every official checkpoint imported: MoCo v3, the RDM, the
VQGAN, RCG's rep-conditioned MAGE and LTH14/mage's unconditional MAGE, from toy-size files in their official
layouts (tests/official_files.py). No RCG model trains (only what scores them); every declared output must exist.

``score.spaces`` keeps the micro default: the label-trained judge learns the built-in set's labels and the encoder
space uses the imported MoCo v3 encoder. Inception needs its weights file, which the test lacks.
"""

import csv
import json
from pathlib import Path

import torch
import yaml

from conftest import MICRO, micro_params
from official_files import mocov3_file, rdm_file, rep_mage_file, uncond_mage_file, vqgan_file
from pipeline.core.artifacts import load_checkpoint
from pipeline.core.config import dump_yaml
from pipeline.models.encoder import build_encoder
from pipeline.models.mage import MAGE, mage_kwargs
from pipeline.models.rdm import RDM, rdm_kwargs
from pipeline.models.vqgan import VQGAN, model_kwargs
from test_dvc import _dvc, _project, _ran
from test_dvc_deps import _changed_stages

IMPORTS = {"pretrain_encoder": "encoder.pt", "train_rdm": "rdm.pt", "train_tokenizer": "tokenizer.pt",
           "train_pixel-rep": "pixel-rep.pt", "train_pixel-none": "pixel-none.pt"}  # curve name: model file


OFFICIAL_MAGE = ["pixel.model.vocab=official", "pixel.model.grid_conv=0"]  # what official MAGE files hold


def official_files(root: Path) -> list[str]:
    """Toy-size official files that fit the micro params, each embedding the encoder / VQGAN the others are made
    with (so every import's checks compare weights); -> the ``--set`` overrides that import them."""
    root.mkdir()
    params = micro_params(root, OFFICIAL_MAGE)
    torch.manual_seed(0)
    encoder = build_encoder(MICRO["encoder"]["model"])
    vqgan = VQGAN(**model_kwargs(params.tokenizer.model))
    rdm = RDM(**rdm_kwargs(params.rdm.model))
    with torch.no_grad():  # off the init, whose zero output layer samples one point
        for p in rdm.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    grid = params.views.crop // vqgan.downsample_factor
    mage = {c: MAGE(**mage_kwargs(params.pixel.model, vqgan.quantize.n_embed, grid * grid,
                                  params.encoder.model.proj_dim, c)) for c in ("rep", "none")}
    files = {"encoder.checkpoint": mocov3_file(root / "vit-b-300ep.pth.tar", encoder),
             "rdm.checkpoint": rdm_file(root / "checkpoint-last.pth", rdm, encoder.state_dict()),
             "tokenizer.checkpoint": vqgan_file(root / "vqgan_jax_strongaug.ckpt", vqgan),
             "pixel.checkpoints.rep": rep_mage_file(root / "mage-b-rep.pth", mage["rep"], encoder.state_dict(),
                                                    vqgan.state_dict()),
             "pixel.checkpoints.none": uncond_mage_file(root / "mage-vitb-1600.pth", mage["none"],
                                                        vqgan.state_dict())}
    official_rdm = ["rdm.model.whiten_power=0", "rdm.train.min_snr_gamma=null"]  # how official RDMs are trained
    return [f"{key}={path}" for key, path in files.items()] + official_rdm + OFFICIAL_MAGE


def test_dvc_repro_with_every_checkpoint_imported(tmp_path):
    (tmp_path / "project").mkdir()
    proj = _project(tmp_path / "project")
    overrides = official_files(tmp_path / "official")
    (proj / "params.yaml").write_text(dump_yaml(micro_params(Path("."), overrides)))

    out = _dvc(proj, "repro")
    assert {"pretrain_encoder", "train_rdm", "train_tokenizer", "train_pixel@rep", "train_pixel@none",
            "compare"} <= _ran(out)
    assert (proj / "metrics" / "compare.md").is_file()
    from dvc.repo import Repo

    with Repo(str(proj)) as repo:  # every output of every stage instance, as DVC resolves them
        declared = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
    assert declared and not [str(p) for p in declared if not p.exists()]
    for curve, model in IMPORTS.items():
        payload = load_checkpoint(proj / "data" / "models" / model)
        assert payload["summary"]["source"] == "official", model
        with open(proj / "metrics" / "plots" / f"{curve}.csv") as f:
            assert list(csv.reader(f)) == [["step"]], curve  # no invented training rows
    plots = json.loads(_dvc(proj, "plots", "show", "--json"))
    assert "errors" not in json.dumps(plots) and "metrics/plots/train_pixel-none.csv" in json.dumps(plots)
    assert _ran(_dvc(proj, "repro")) == {"scan"}  # everything cached; the folder listing is checked every time

    tree = yaml.safe_load((proj / "params.yaml").read_text())  # each generator depends on its own file only
    tree["pixel"]["checkpoints"]["none"] = str(tmp_path / "official" / "another.pth")
    (proj / "params.yaml").write_text(yaml.safe_dump(tree))
    status = _dvc(proj, "status")
    assert "train_pixel@none:" in status and "train_pixel@rep:" not in status
    assert "train_pixel" in _changed_stages(status) and "train_rdm" not in _changed_stages(status)
