"""The params schema: defaults equal params.yaml, and bad params fail before any work, naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import Params, load_params, preset, validate
from pipeline.core.errors import RcgError

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_schema_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


def test_params_yaml_spells_out_every_field():
    """DVC hashes the values params.yaml holds: a field left to its schema default would not rerun the stages
    that read it when that default changes."""
    def missing(schema: dict, written: dict, where: str) -> list[str]:
        out = [f"{where}{k}" for k in schema if k not in written]
        return out + [m for k, v in schema.items() if isinstance(v, dict) and isinstance(written.get(k), dict)
                      for m in missing(v, written[k], f"{where}{k}.")]
    assert missing(Params().model_dump(), yaml.safe_load((ROOT / "params.yaml").read_text()), "") == []


@pytest.mark.parametrize("name", ["default", "cifar10", "cifar10_cpu", "folder", "imagenet256_vitb", "imagenet256_vitl",
                                  "imagenet256_vitb_mage"])
def test_presets_validate(name):
    p = preset(name)
    assert isinstance(p, Params)


PINNED = {"encoder": {"model": ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "proj_hidden_dim"]},
          "rdm": {"model": ["model_channels", "num_res_blocks", "whiten_power"], "train": ["min_snr_gamma"]},
          "tokenizer": {"model": ["ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed"]}}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "pipeline" / "presets").glob("*.yaml")
                                         if p.stem != "default"))
def test_presets_name_their_architectures(name):
    """A preset inherits every key it leaves out from the CPU defaults, so an unnamed model size silently changes
    when those do (the cifar10 encoder once became the default run's patch 8 / width 64 that way)."""
    tree = yaml.safe_load((ROOT / "pipeline" / "presets" / f"{name}.yaml").read_text())
    missing = [f"{section}.{group}.{key}" for section, groups in PINNED.items() for group, keys in groups.items()
               for key in keys if key not in (tree.get(section) or {}).get(group, {})]
    assert not missing, f"preset {name} leaves {missing} to the defaults"


def test_imagenet_preset_has_official_sizes():
    p = preset("imagenet256_vitb")
    assert (p.encoder.model.embed_dim, p.encoder.model.depth, p.encoder.model.img_size) == (768, 12, 224)
    assert (p.rdm.model.model_channels, p.rdm.model.num_res_blocks) == (1536, 12)
    assert p.tokenizer.model.n_embed == 1024 and p.tokenizer.model.ch_mult == [1, 1, 2, 2, 4]
    mage = preset("imagenet256_vitb_mage").views
    assert (mage.resize, mage.crop, mage.flip, mage.count) == (292, 256, False, 1)


# The folder preset at 128 and 64 px: the keys README ("Your own images, without labels") tells a user to change.
FOLDER_RESOLUTIONS = {
    256: [],
    128: ["shard.resize_short_side=128", "views.resize=128", "views.crop=128", "encoder.model.img_size=128",
          "encoder.model.patch_size=16", "tokenizer.model.ch_mult=[1, 2, 2, 4]"],
    64: ["shard.resize_short_side=64", "views.resize=64", "views.crop=64", "encoder.model.img_size=64",
         "encoder.model.patch_size=8", "tokenizer.model.ch_mult=[1, 2, 4]"],
}


def test_folder_preset_needs_no_labels():
    """A user's folder: no label is read anywhere (no judge, no class row), the val split is held out of the folder,
    and the scores are the ssl_judge's and the encoder's."""
    p = preset("folder")
    assert (p.data.source, p.data.labels, p.data.val_folder) == ("folder", "none", None) and p.data.holdout > 0
    assert p.score.label_spaces == [] and "judge" not in p.score.spaces
    assert set(p.score.spaces) == {"ssl_judge", "encoder"} and p.score.ssl_spaces == ["ssl_judge"]
    assert "class" not in p.pixel.conditionings and "class" not in p.sample.settings
    assert p.runtime.device == "cuda" and p.encoder.checkpoint is None and p.tokenizer.checkpoint is None
    official = preset("imagenet256_vitb")
    assert p.tokenizer.model == official.tokenizer.model  # tokenizer.checkpoint imports MAGE's VQGAN as it is
    vitb = preset("folder", ["encoder.model.embed_dim=768", "encoder.model.num_heads=12"])  # README: MoCo v3 ViT-B
    assert vitb.encoder.model == official.encoder.model


@pytest.mark.parametrize("size", sorted(FOLDER_RESOLUTIONS))
def test_folder_preset_at_each_resolution(size):
    """Every resolution README names is valid params with 16x16 tokens (the same MAGE and decoding steps), views at
    that size from shards stored at it, and the encoder's patches tiling its input."""
    p = preset("folder", FOLDER_RESOLUTIONS[size])
    assert p.views.crop == p.views.resize == p.shard.resize_short_side == size
    factor = 2 ** (len(p.tokenizer.model.ch_mult) - 1)
    assert size // factor == 16 and all(s.iterations <= 16 * 16 for s in p.sample.settings.values())
    assert p.encoder.model.img_size in (size, 224) and p.encoder.model.img_size // p.encoder.model.patch_size >= 8


def test_mage_preset_resizes_the_originals():
    """MAGE's recipe resizes the original image to 292 before the 256 crop: its shards keep the original bytes
    rather than 256 px copies that the views would upsample."""
    p = preset("imagenet256_vitb_mage")
    assert p.shard.resize_short_side is None and p.views.resize == 292


@pytest.mark.parametrize("override, fragment", [
    (["rdm.model.model_channels=-4"], "rdm.model.model_channels"),
    (["rdm.train.stepz=3"], "rdm.train.stepz: unknown key"),
    (["nosuchsection.x=1"], "nosuchsection: unknown key"),
    (["encode.batch_size=many"], "encode.batch_size"),
    (["data.source=folder"], "data.folder: required"),
    (["tokenizer.model.n_embed=70000"], "uint16"),
    (["views.crop=64", "views.resize=32"], "views.crop"),
    (["shard.reencode_format=gif"], "shard.reencode_format"),
    (["shard.resize_short_side=256", "views.resize=292", "views.crop=256"],
     "views.resize (292) is above shard.resize_short_side (256)"),
    (["score.reference_npz.dinov2=/x/ref.npz"], "score.reference_npz.dinov2: needs score.dinov2_weights"),
    (["score.spaces=[]", "score.label_spaces=[]", "score.ssl_spaces=[]"], "nothing to score in"),
])
def test_bad_params_name_the_key(override, fragment):
    with pytest.raises(RcgError, match="invalid params") as err:
        load_params(None, override)
    assert fragment in str(err.value)


def test_override_types_and_errors():
    p = load_params(None, ["rdm.train.steps=12", "views.flip=false", "tokenizer.model.ch_mult=[1, 2]",
                           "encoder.checkpoint=null"])
    assert p.rdm.train.steps == 12 and p.views.flip is False and p.tokenizer.model.ch_mult == [1, 2]
    with pytest.raises(RcgError, match="key=value"):
        load_params(None, ["rdm.train.steps"])
    with pytest.raises(RcgError, match="is a value, not a section"):
        load_params(ROOT / "params.yaml", ["seed.x=1"])


def test_params_file_errors(tmp_path):
    with pytest.raises(RcgError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rdm: [1, 2\n")
    with pytest.raises(RcgError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RcgError, match="mapping"):
        load_params(bad)


def test_params_name_files_that_do_not_exist_yet():
    """The schema checks no path: each stage checks the files it reads (tests/test_path_checks.py)."""
    written = preset("imagenet256_vitb")
    assert written.encoder.checkpoint is not None and not written.encoder.checkpoint.exists()
    assert validate(yaml.safe_load(yaml.safe_dump(written.model_dump(mode="json")))) == written
    p = load_params(None, ["data.source=folder", "data.folder=/definitely/not/here",
                           "rdm.checkpoint=/no/such/ckpt.pth", "score.inception_weights=/no/such/w.pth"])
    assert str(p.data.folder) == "/definitely/not/here" and str(p.rdm.checkpoint) == "/no/such/ckpt.pth"
    with pytest.raises(RcgError, match="unknown preset"):
        preset("nope")


def test_preset_takes_overrides():
    p = preset("imagenet256_vitb", ["sample.num_samples=8", "sample.settings.rcg.guidance=2"])
    assert p.sample.num_samples == 8 and p.sample.settings["rcg"].guidance == 2
    assert p.sample.settings["rcg"].iterations == 20 and p.sample.rdm.steps == 250


def test_model_files_are_named_in_one_place():
    paths = Params().paths
    assert paths.model_file("encoder") == Path("data/models/encoder.pt")
    assert paths.model_file("pixel", "rep") == Path("data/models/pixel-rep.pt")
    for bad in (("pixel",), ("rdm", "rep"), ("vae",)):
        with pytest.raises(ValueError):
            paths.model_file(*bad)


def test_every_model_file_kind_loads_and_saves_through_one_registry(tmp_path):
    """The kinds pipeline.models registers are Paths' MODEL_FILES; a file saved as a kind loads back as it, in eval
    mode; an unregistered kind or a file of another kind is one line."""
    import pipeline.models.encoder, pipeline.models.judge, pipeline.models.mage  # noqa: E401,F401
    import pipeline.models.rdm, pipeline.models.ssl_judge, pipeline.models.vqgan  # noqa: E401,F401
    from pipeline.core.artifacts import MODEL_KINDS, load_model, save_model
    from pipeline.core.config import MODEL_FILES
    from pipeline.models.judge import Judge
    assert set(MODEL_KINDS) == set(MODEL_FILES)
    config = {"img_size": 16, "num_classes": 5, "width": 8, "stages": 2}
    path = tmp_path / "judge.pt"
    save_model("judge", path, {"model": config}, Judge(**config).state_dict())
    model, payload = load_model("judge", path)
    assert isinstance(model, Judge) and not model.training and payload["format"] == "rcg-judge"
    with pytest.raises(RcgError, match="holds a 'rcg-judge' model, expected 'rcg-encoder'"):
        load_model("encoder", path)
    with pytest.raises(RcgError, match="no model kind 'vae'"):
        load_model("vae", path)
