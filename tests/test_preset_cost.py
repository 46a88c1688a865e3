"""bench/preset_cost.py, the FLOP estimate README's "Your own images" costs come from, on the micro params: every
stage of a run has a row, and the counts follow the params."""

import pytest

from bench import preset_cost
from conftest import micro_params
from pipeline.core.config import dump_yaml


@pytest.mark.integration  # a bench tool, counted on the micro models (~15 s), like gpu_check's tiny run
def test_every_stage_has_a_row_that_follows_the_params(tmp_path, capsys):
    params = micro_params(tmp_path)
    rows = {r.stage: r for r in preset_cost.costs(params, images=1000)}
    assert list(rows) == ["pretrain_encoder", "encode", "train_rdm", "train_tokenizer", "tokenize", "train_pixel@rep",
                          "train_pixel@none", "train_ssl_judge@ssl_judge", "sample@rcg", "sample@rcg_cfg",
                          "sample@baseline", "sample@oracle"]
    assert all(r.gflop_per_item > 0 and r.items > 0 for r in rows.values())
    n = params.data.builtin.num_train  # the built-in set: --images does not apply
    assert rows["encode"].items == n * params.views.count
    assert rows["train_pixel@rep"].items == params.pixel.train.steps * params.pixel.train.batch_size
    guided, plain = rows["sample@rcg_cfg"].gflop_per_item, rows["sample@rcg"].gflop_per_item
    assert guided > plain > rows["sample@baseline"].gflop_per_item  # two rows a step; the RDM's passes
    assert "CNN" in rows["train_ssl_judge@ssl_judge"].work  # beside the micro run's ViT encoder
    beside_resnet = micro_params(tmp_path, ["encoder.model.arch=resnet", "ssl_judge.model.vit.embed_dim=16",
                                            "ssl_judge.model.vit.depth=1"])
    vit_row = {r.stage: r for r in preset_cost.costs(beside_resnet, images=1000)}["train_ssl_judge@ssl_judge"]
    assert "ViT 16x1 at 16/8" in vit_row.work and vit_row.gflop_per_item > 0
    imported = micro_params(tmp_path, ["score.spaces=[judge, encoder]", "score.ssl_spaces=[]"])
    assert "train_ssl_judge@ssl_judge" not in {r.stage for r in preset_cost.costs(imported, images=1000)}
    folder = micro_params(tmp_path, ["data.source=folder", "data.folder=x", "data.holdout=0.25"])
    assert preset_cost.train_images(folder, 1000) == 750
    (tmp_path / "params.yaml").write_text(dump_yaml(params))
    preset_cost.main(["--params", str(tmp_path / "params.yaml"), "--images", "100"])
    out = capsys.readouterr().out
    assert "| train_tokenizer |" in out and out.strip().splitlines()[-1].startswith("| all |")

