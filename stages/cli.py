"""The ``rcg`` command: one sub-command per stage, calling the same ``stages.<name>.run`` as dvc.yaml."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pipeline.core.errors import RcgError

if TYPE_CHECKING:
    from pipeline.core.config import Params

app = typer.Typer(help="RCG pipeline: run any stage alone (dvc repro runs them all).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: key.path=value (repeatable).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def _fail(command: str, message: str, code: int) -> None:
    typer.echo(f"rcg {command}: error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(command: str, debug: bool, fn):
    """Run ``fn``; bad input becomes one clear line and exit code 2 (traceback only with --debug)."""
    try:
        return fn()
    except RcgError as exc:
        if debug:
            raise
        _fail(command, str(exc), 2)
    except KeyboardInterrupt:
        _fail(command, "interrupted (rerun to resume where supported)", 130)
    except Exception as exc:
        if debug:
            raise
        _fail(command, f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)


# A stage's module is named after the stage, except where that name would shadow the standard library.
STAGE_MODULES = {"tokenize": "tokenize_views"}


# The stages that share their work across ranks under torchrun, each with the test for a run of it that is an
# import of an official checkpoint (rank 0's work alone, on one process): runtime.launcher runs the rest under it.
DISTRIBUTED_STAGES = {
    "pretrain_encoder": lambda params, item: params.encoder.checkpoint is not None,
    "encode": lambda params, item: False,
    "train_rdm": lambda params, item: params.rdm.checkpoint is not None,
    "train_tokenizer": lambda params, item: params.tokenizer.checkpoint is not None,
    "tokenize": lambda params, item: False,
    "train_pixel": lambda params, item: params.pixel.checkpoints.get(item) is not None,
    "train_judge": lambda params, item: False,
    "train_ssl_judge": lambda params, item: False,
    "sample": lambda params, item: False,
}
LAUNCHED = "RCG_LAUNCHED"  # set in the processes a launcher starts, which never launch again


def launch_command(launcher: str, name: str, item: str | None, params_file: Path, overrides: list[str],
                   debug: bool) -> list[str]:
    """``runtime.launcher`` running ``python -m stages.cli`` with this very stage command."""
    argv = [*shlex.split(launcher), "-m", "stages.cli", name.replace("_", "-"),
            *([item] if item is not None else []), "--params", str(params_file)]
    for assignment in overrides:
        argv += ["--set", assignment]
    return argv + (["--debug"] if debug else [])


def _relaunch(name: str, params, item: str | None, params_file: Path, overrides: list[str], debug: bool) -> None:
    """Become ``runtime.launcher`` running this stage (never returns) when one is set, the stage shares its work
    across ranks and this process was not started by a launcher (torchrun sets WORLD_SIZE); else do nothing."""
    launcher = params.runtime.launcher
    if (not launcher or "WORLD_SIZE" in os.environ or LAUNCHED in os.environ or name not in DISTRIBUTED_STAGES
            or DISTRIBUTED_STAGES[name](params, item)):
        return
    argv = launch_command(launcher, name, item, params_file, overrides, debug)
    if shutil.which(argv[0]) is None:
        raise RcgError(f"runtime.launcher: {argv[0]!r} is not on PATH (launcher {launcher!r})")
    typer.echo(f"rcg {name.replace('_', '-')}: running under {shlex.join(argv)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, {**os.environ, LAUNCHED: "1"})


def run_stage(name: str, params_file: Path, overrides: list[str] | None, debug: bool, item: str | None = None) -> None:
    """Run ``stages.<name>.run(params)``, or ``run(params, item)`` for a stage with one instance per item
    (``train_pixel@rep`` in dvc.yaml is ``rcg train-pixel rep``), under ``runtime.launcher`` when one is set; the
    process group the stage joins is destroyed when it ends."""
    from pipeline.core import distributed
    from pipeline.core.config import load_params
    from pipeline.core.locks import locked_outputs, stage_outputs
    from pipeline.core.runtime import configure

    def go():
        params = load_params(params_file, overrides or [])
        _relaunch(name, params, item, params_file, overrides or [], debug)
        configure(params.runtime)
        module = importlib.import_module(f"stages.{STAGE_MODULES.get(name, name)}")
        command = name.replace("_", "-") + (f" {item}" if item is not None else "")
        with locked_outputs(stage_outputs(name, params.paths, item), command):  # before any work
            with distributed.stage_scope():
                return module.run(params) if item is None else module.run(params, item)

    summary = _guarded(name.replace("_", "-"), debug, go)
    typer.echo(json.dumps(summary, indent=2, default=str))


def _stage_command(name: str, help_text: str) -> None:
    def command(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, debug: DebugOpt = False) -> None:
        run_stage(name, params, set_, debug)
    command.__doc__ = help_text
    app.command(name.replace("_", "-"))(command)


def _item_stage_command(name: str, item_help: str, help_text: str) -> None:
    """A stage with one instance per item (a conditioning, a sample setting): the item is a positional argument."""
    def command(item: str, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                debug: DebugOpt = False) -> None:
        run_stage(name, params, set_, debug, item)
    command.__doc__ = help_text
    # set as an object: under postponed annotations a string naming ``item_help`` could not be evaluated
    command.__annotations__["item"] = Annotated[str, typer.Argument(help=item_help)]
    app.command(name.replace("_", "-"))(command)


for _name, _help in [
    ("scan", "The image folders' listing (names, sizes, mtimes) -> data/folder_listing.json: what shard reruns on."),
    ("shard", "Image folder (or the built-in set) -> WebDataset shards + index.parquet + rejects.parquet."),
    ("pretrain_encoder", "MoCo v3 pretraining on the shards, or import the official encoder checkpoint."),
    ("encode", "Encode every view of every image once -> data/reps.zarr."),
    ("train_rdm", "Train the Representation Diffusion Model on data/reps.zarr and evaluate it."),
    ("train_tokenizer", "Train a VQGAN on the shards, or import the official tokenizer checkpoint."),
    ("eval_tokenizer", "Reconstruction PSNR, codebook usage and representation-space FD of the tokenizer."),
    ("tokenize", "Tokenize every view of every image once -> data/tokens.zarr."),
    ("train_judge", "Train the judge classifier on the train split's labels -> data/models/judge.pt."),
    ("train_ssl_judge", "Train the self-supervised ssl_judge (MoCo v3, a CNN or a ViT) -> data/models/ssl_judge.pt."),
    ("compare", "Every setting's scores in one table -> metrics/compare.json, metrics/compare.md."),
]:
    _stage_command(_name, _help)
_item_stage_command("train_pixel", "Conditioning: rep, none, class or cluster.",
                    "Train the MAGE pixel generator on data/tokens.zarr + data/reps.zarr (or import the official one).")
_item_stage_command("reference", "Feature space: judge, encoder, ssl_judge, inception or dinov2.",
                    "Reference statistics of the train split in one feature space -> data/reference/<space>.npz.")


@app.command()
def info(path: Path, debug: DebugOpt = False) -> None:
    """Summarise an artifact: a shard folder, a .zarr store, a model file or a checkpoint."""
    from pipeline.data.describe import describe
    typer.echo(json.dumps(_guarded("info", debug, lambda: describe(path)), indent=2, default=str))


@app.command()
def preset(name: str, out: Annotated[Path, typer.Option(help="Where to write the full params file.")] = Path("params.yaml"),
           set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Write a complete params file from a named preset (default, cifar10, folder, imagenet256_vitb, ...), with
    --set applied and the result validated (your folder, another resolution: README)."""
    from pipeline.core.artifacts import atomic_file
    from pipeline.core.config import dump_yaml
    from pipeline.core.config import preset as load_preset

    def go():
        sets = "".join(f" --set {s}" for s in set_ or [])
        text = f"# written by `rcg preset {name}{sets}`\n" + dump_yaml(load_preset(name, set_ or []))
        with atomic_file(out) as tmp:
            tmp.write_text(text)
        return out

    typer.echo(f"wrote {_guarded('preset', debug, go)}")


@app.command("make-builtin")
def make_builtin(out: Path, count: int = 100, size: int = 32, seed: int = 0, split: str = "train") -> None:
    """Write built-in images to a folder (ImageNet layout) to look at them or shard them like any folder."""
    from pipeline.data.synthetic import write_builtin
    typer.echo(f"wrote {write_builtin(out, split, count, size, seed)}")


FileOpt = Annotated[Optional[Path], typer.Option(help="A model file (ours or official); default: the project's.")]
OfflineFile = Annotated[Optional[Path], typer.Option(help="Offline: a model file, ours or official (--rdm for RDM "
                                                          "reps only).")]
PresetOpt = Annotated[Optional[str], typer.Option(help="Offline: take the settings from this preset (e.g. "
                                                       "imagenet256_vitb: RCG's official sampler) instead of --params.")]
DEFAULT_PARAMS = Path("params.yaml")


def offline_params(params_file: Path, preset_name: str | None, overrides: list[str] | None) -> tuple[Params, str]:
    """The params of an offline command and where they came from (for its log): ``--preset NAME``, else the params
    file (``params.yaml`` when it exists here), else the built-in defaults; ``--set`` on top of either."""
    from pipeline.core.config import load_params, preset
    overrides = overrides or []
    if preset_name is not None:
        if params_file != DEFAULT_PARAMS:
            raise RcgError("--preset and --params both give the settings: give one")
        params, source = preset(preset_name, overrides), f"preset {preset_name}"
    elif params_file.exists() or params_file != DEFAULT_PARAMS:
        params, source = load_params(params_file, overrides), f"params file {params_file}"
    else:
        params = load_params(None, overrides)
        source = ("the built-in defaults, the default CPU run's (no params.yaml here; --preset imagenet256_vitb "
                  "gives RCG's official sampler)")
    return params, source + "".join(f" + --set {o}" for o in overrides)


@app.command()
def sample(setting: Annotated[str, typer.Argument(help="A name in sample.settings (rcg, rcg_cfg, baseline, oracle, "
                                                       "class, cluster).")],
           params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, debug: DebugOpt = False,
           out: Annotated[Optional[Path], typer.Option(help="Offline: write OUT/<setting>.zarr and "
                                                            "OUT/figures/<setting>/ from the files given.")] = None,
           pixel: OfflineFile = None, tokenizer: OfflineFile = None, rdm: OfflineFile = None,
           reps: Annotated[Optional[Path], typer.Option(help="Offline: a reps.zarr (oracle reps, figures).")] = None,
           shards: Annotated[Optional[Path], typer.Option(help="Offline: a shard folder (figures).")] = None,
           preset: PresetOpt = None) -> None:
    """Generate one setting's images -> data/samples/<setting>.zarr + metrics/figures/<setting>/ (or, with --out,
    from any model files given by path, outside the DVC graph, with the sampler of --preset or --params)."""
    if out is None:
        if any(v is not None for v in (pixel, tokenizer, rdm, reps, shards, preset)):
            _fail("sample", "--pixel/--tokenizer/--rdm/--reps/--shards/--preset are for the offline mode: add --out DIR",
                  2)
        return run_stage("sample", params, set_, debug, setting)

    def go():
        from pipeline.core.locks import locked_outputs
        from stages.sample import run_files
        if pixel is None or tokenizer is None:
            raise RcgError("the offline mode (--out) needs --pixel FILE and --tokenizer FILE")
        p, source = offline_params(params, preset, set_)
        with locked_outputs([out / f"{setting}.zarr", out / "figures" / setting], f"sample {setting} --out {out}"):
            return run_files(p, setting, out, pixel, tokenizer, rdm, reps, shards, source)

    typer.echo(json.dumps(_guarded("sample", debug, go), indent=2, default=str))


@app.command()
def edit(image: Path, box: Annotated[str, typer.Option(help="x0,y0,x1,y1 in pixels of the image brought to the "
                                                            "generator's size (x1, y1 exclusive); past the border: "
                                                            "outpainting.")],
         out: Annotated[Path, typer.Option(help="The PNG to write.")],
         rep_from: Annotated[Optional[Path], typer.Option(help="Condition on this image's rep.")] = None,
         rep_from_rdm: Annotated[bool, typer.Option(help="Condition on an RDM sample.")] = False,
         pixel: FileOpt = None, tokenizer: FileOpt = None, encoder: FileOpt = None, rdm: FileOpt = None,
         iterations: int = 20, temperature: float = 6.0, guidance: float = 0.0, seed: int = 0,
         composite: Annotated[bool, typer.Option(help="Keep the input's pixels outside the generated tokens.")] = True,
         params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, debug: DebugOpt = False,
         preset: PresetOpt = None) -> None:
    """Regenerate a box of IMAGE conditioned on its own rep (default), another image's, or an RDM sample."""
    def go():
        from stages.edit import run
        p, _ = offline_params(params, preset, set_)
        return run(p, image, box, out, rep_from, rep_from_rdm, pixel, tokenizer, encoder, rdm, iterations,
                   temperature, guidance, seed, composite)

    typer.echo(json.dumps(_guarded("edit", debug, go), indent=2, default=str))


@app.command()
def score(setting: Annotated[Optional[str], typer.Argument(help="Sample setting: rcg, rcg_cfg, baseline, oracle, "
                                                                "class or cluster (the DVC stage), or real: the "
                                                                "held-out images (score_real).")] = None,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, debug: DebugOpt = False,
          samples: Annotated[Optional[Path], typer.Option(help="Offline: a sample store (.zarr) or a folder of "
                                                               "PNG/JPEG images to score instead of a setting.")] = None,
          reference_npz: Annotated[Optional[list[str]], typer.Option(
              help="Offline: [SPACE=]FILE, a reference .npz (mu, sigma; optional features) per space scored; "
                   "SPACE is judge, encoder, ssl_judge, inception or dinov2 (the default: ADM's reference batch). "
                   "Repeatable.")] = None,
          inception_weights: Annotated[Optional[Path], typer.Option(
              help="Offline: torch-fidelity's Inception weights file (default: score.inception_weights).")] = None,
          dinov2_weights: Annotated[Optional[Path], typer.Option(
              help="Offline: a DINOv2 state dict in timm's layout (default: score.dinov2_weights).")] = None,
          judge: FileOpt = None, encoder: FileOpt = None, ssl_judge: FileOpt = None,
          out: Annotated[Optional[Path], typer.Option(help="Offline: also write the figures to this JSON file.")] = None,
          preset: PresetOpt = None) -> None:
    """Score a setting's samples (judge, encoder, Inception) -> metrics/score/<setting>.json; or, with --samples,
    any sample store or image folder against reference .npz files given by path (outside the DVC graph)."""
    offline = (reference_npz, inception_weights, dinov2_weights, judge, encoder, ssl_judge, out, preset)
    if samples is None:
        if any(v is not None for v in offline):
            _fail("score", "--reference-npz/--inception-weights/--dinov2-weights/--judge/--encoder/--ssl-judge/--out/"
                           "--preset are for the offline mode: add --samples PATH", 2)
        if setting is None:
            _fail("score", "give a SETTING (the DVC stage) or --samples PATH (offline)", 2)
        return run_stage("score", params, set_, debug, setting)
    if setting is not None:
        _fail("score", f"--samples scores the store or folder given: drop the setting {setting!r}", 2)

    def go():
        from pipeline.eval.fidelity import SPACES
        from stages.score import run_files
        references = {}
        for entry in reference_npz or []:
            space, sep, path = entry.partition("=")
            if not sep or space not in SPACES:
                space, path = "inception", entry
            references[space] = Path(path)
        given = {"inception": inception_weights, "dinov2": dinov2_weights, "judge": judge, "encoder": encoder,
                 "ssl_judge": ssl_judge}
        p, _ = offline_params(params, preset, set_)
        return run_files(p, samples, references, {s: w for s, w in given.items() if w is not None}, out)

    typer.echo(json.dumps(_guarded("score", debug, go), indent=2, default=str))


def main() -> None:
    app(prog_name="rcg")


if __name__ == "__main__":
    sys.exit(main())
