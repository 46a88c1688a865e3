"""Official MAGE-B/L checkpoints (``{'model': state, 'args': Namespace, ...}``) as our
:class:`~pipeline.models.mage.MAGE`: every key accounted for, and the frozen encoder and VQGAN the file embeds
checked against the stores a run pairs it with.

Two layouts: RCG's rep-conditioned MAGE (docs/official.md §3.4; the ``rep`` generator) and LTH14/mage's
unconditional MAGE (``models_mage.py``; the ``none`` generator, the baseline), which has no rep slot
(``fake_latent``, ``latent_prior_proj``) and embeds no encoder: its position 0 is the token embedding of the class
id 1100, which the import turns into the constant slot of our ``none`` generator (:func:`unconditional_slot`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.core.artifacts import file_sha256, load_checkpoint, load_model_file, weights_sha256
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.models.mage import MAGE, MAGE_SIZES, OFFICIAL_EXTRA_IDS, BertEmbeddings
from pipeline.models.official.mocov3 import check_official_encoder
from pipeline.models.vqgan import MODEL_FORMAT as VQGAN_FORMAT
from pipeline.models.official.vqgan import infer_vqgan_config

ENCODER_PREFIX, VQGAN_PREFIX = "pretrained_encoder.", "vqgan."
REP_SLOT = ("fake_latent", "latent_prior_proj.weight", "latent_prior_proj.bias")  # RCG's additions to MAGE
LAYOUTS = {"rep": "RCG's rep-conditioned MAGE (it has a rep slot, latent_prior_proj)",
           "none": "an unconditional MAGE (LTH14/mage's layout: no rep slot)"}


def official_layout(sd: Mapping[str, Any]) -> str:
    """The generator an official MAGE state dict is for: "rep" (RCG's file) or "none" (LTH14/mage's)."""
    return "rep" if "latent_prior_proj.weight" in sd else "none"


def official_unused_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The parameters an official file holds that the official forward never reads, with their shapes: the MAE
    leftovers (patch embedding, cls/mask tokens, fixed sin-cos tables, pixel head). Checked, then dropped."""
    d, dd, n = config["embed_dim"], config["decoder_embed_dim"], config["seq_len"] + 1
    return {"cls_token": (1, 1, d), "pos_embed": (1, n, d), "mask_token": (1, 1, dd), "decoder_pos_embed": (1, n, dd),
            "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
            "decoder_pred.weight": (16 * 16 * 3, dd), "decoder_pred.bias": (16 * 16 * 3,)}


def _few(keys: list[str], n: int = 4) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def infer_official_config(sd: Mapping[str, Any], num_heads: int | None = None,
                          decoder_num_heads: int | None = None, rep_dim: int | None = None) -> dict:
    """MAGE kwargs of an official state dict, read from its shapes; heads are not in the weights, so they come
    from the arguments or, for MAGE-B/L widths, from MAGE_SIZES. An unconditional file has no rep size either:
    ``rep_dim`` is then the size of the slot our ``none`` generator keeps (the stores' reps)."""
    need = ("token_emb.word_embeddings.weight", "token_emb.position_embeddings.weight", "decoder_embed.weight",
            "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise RcgError(f"not an official MAGE state dict: missing {', '.join(missing)}")
    conditioning = official_layout(sd)
    if conditioning == "rep":
        rep_dim = sd["latent_prior_proj.weight"].shape[1]
    elif rep_dim is None:
        raise RcgError("an unconditional MAGE has no rep slot: give the rep size of the none generator")
    vocab, dim = sd["token_emb.word_embeddings.weight"].shape
    dec_dim = sd["decoder_embed.weight"].shape[0]
    size = next((s for s in MAGE_SIZES.values() if (s["embed_dim"], s["decoder_embed_dim"]) == (dim, dec_dim)), {})
    num_heads = num_heads or size.get("num_heads")
    decoder_num_heads = decoder_num_heads or size.get("decoder_num_heads")
    if num_heads is None or decoder_num_heads is None:
        raise RcgError(f"official MAGE of width {dim} / decoder {dec_dim} is neither MAGE-B nor MAGE-L: give its heads")

    def depth(prefix: str) -> int:
        return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

    return dict(codebook_size=vocab - OFFICIAL_EXTRA_IDS - 1,
                seq_len=sd["token_emb.position_embeddings.weight"].shape[0] - 1,
                rep_dim=rep_dim, conditioning=conditioning, num_labels=0, vocab="official",
                embed_dim=dim, depth=depth("blocks."), num_heads=num_heads, decoder_embed_dim=dec_dim,
                decoder_depth=depth("decoder_blocks."), decoder_num_heads=decoder_num_heads,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, grid_conv=0)


def unconditional_slot(state: Mapping[str, torch.Tensor], config: dict, slot_id: int) -> dict:
    """The rep-slot parameters that make our ``none`` generator compute what LTH14/mage's unconditional MAGE does.
    There, position 0 holds the token embedding of the class id ``slot_id`` (word + position embedding, LayerNorm,
    then dropout, which is off at inference); ours overwrites position 0 with latent_prior_proj(fake_latent). A
    zero projection whose bias is that embedding gives the same vector: exact in eval mode."""
    word = state["token_emb.word_embeddings.weight"]
    with torch.device(word.device):
        embeddings = BertEmbeddings(word.shape[0], word.shape[1], config["seq_len"] + 1, dropout=0.0)
    tables = {k[len("token_emb."):]: v for k, v in state.items() if k.startswith("token_emb.")}
    embeddings.load_state_dict({**tables, "position_ids": embeddings.position_ids}, assign=True)  # 0..L: position 0
    with torch.no_grad():
        slot = embeddings.eval()(torch.full((1, 1), slot_id, device=word.device))[0, 0]
    zeros = word.new_zeros
    return {"fake_latent": zeros(1, config["rep_dim"]),
            "latent_prior_proj.weight": zeros(word.shape[1], config["rep_dim"]), "latent_prior_proj.bias": slot}


def convert_official_mage(sd: Mapping[str, Any], rep_dim: int | None = None,
                          **heads: int) -> tuple[dict, dict, dict, dict]:
    """Split an official MAGE state dict into (MAGE kwargs, MAGE state, embedded MoCo v3 encoder state, embedded
    VQGAN state), accounting for every key: a key that is neither ours, nor one of :func:`official_unused_shapes`
    (shape-checked), nor under ``pretrained_encoder.`` / ``vqgan.`` is an error, as is any of ours missing or
    misshapen. RCG's rep-conditioned file must embed both; LTH14/mage's unconditional one (kwargs with
    conditioning "none") embeds the VQGAN only, lacks the rep slot and gets :func:`unconditional_slot` (the
    encoder state is then empty). Works on meta tensors. ``rep_dim``, ``heads``: see infer_official_config."""
    config = infer_official_config(sd, rep_dim=rep_dim, **heads)
    with torch.device("meta"):
        meta_model = MAGE(**config)
    rep_slot = config["conditioning"] == "rep"
    expected = {k: v for k, v in meta_model.state_dict().items() if rep_slot or k not in REP_SLOT}
    unused = official_unused_shapes(config)
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    vqgan = {k[len(VQGAN_PREFIX):]: v for k, v in sd.items() if k.startswith(VQGAN_PREFIX)}
    ours = {k: v for k, v in sd.items() if not k.startswith((ENCODER_PREFIX, VQGAN_PREFIX)) and k not in unused}
    problems = []
    if missing := [k for k in expected if k not in ours]:
        problems.append(f"missing {_few(missing)}")
    if unexpected := [k for k in ours if k not in expected]:
        problems.append(f"unexpected {_few(unexpected)}")
    shapes = {**{k: tuple(v.shape) for k, v in expected.items()}, **unused}
    if wrong := [f"{k} {list(sd[k].shape)} vs {list(s)}" for k, s in shapes.items()
                 if k in sd and tuple(sd[k].shape) != s]:
        problems.append(f"shape mismatch {_few(wrong, 3)}")
    if absent := [k for k in unused if k not in sd]:
        problems.append(f"lacks the official unused parameters {_few(absent)}")
    embedded = ((ENCODER_PREFIX, encoder), (VQGAN_PREFIX, vqgan)) if rep_slot else ((VQGAN_PREFIX, vqgan),)
    if lacking := [prefix + "*" for prefix, part in embedded if not part]:
        problems.append("does not embed its " + " and ".join(lacking))
    if encoder and not rep_slot:
        problems.append(f"embeds an encoder ({ENCODER_PREFIX}*) but has no rep slot (latent_prior_proj) to use it")
    if problems:
        raise RcgError("official MAGE checkpoint does not fit MAGE: " + "; ".join(problems))
    if not rep_slot:
        ours.update(unconditional_slot(ours, config, meta_model.slot_id))
    return config, ours, encoder, vqgan


def read_official_mage(path: str | Path) -> Mapping[str, Any]:
    """The ``model`` state dict of an official RCG MAGE file, read with weights_only=True and only
    ``argparse.Namespace`` allow-listed."""
    ckpt = load_checkpoint(path, safe_globals=(argparse.Namespace,))
    sd = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(sd, Mapping):
        raise RcgError(f"{path} is not an official MAGE checkpoint: no 'model' state dict")
    return sd


def load_official_mage(path: str | Path, rep_dim: int | None = None,
                       **heads: int) -> tuple[MAGE, dict, dict, dict]:
    """(MAGE with the file's weights in eval mode, its kwargs, embedded encoder state, embedded VQGAN state)."""
    sd = read_official_mage(path)
    try:
        config, state, encoder, vqgan = convert_official_mage(sd, rep_dim=rep_dim, **heads)
    except RcgError as exc:
        raise RcgError(f"{path}: {exc}") from None
    model = MAGE(**config)
    model.load_state_dict(state, strict=True)
    return model.eval(), config, encoder, vqgan


def check_official_vqgan(embedded: dict, tokens_identity: dict, tokens_name: str, tokenizer_path: Path,
                         path: Path) -> str:
    """Refuse an official MAGE trained on other tokens than the token store's: its embedded VQGAN must have the
    architecture the store records and, when ``tokenizer_path`` is the very tokenizer file the store was made with
    (its sha256 is recorded), that file's weights. Returns what was compared: "weights" or "architecture"."""
    recorded = tokens_identity.get("tokenizer") or {}
    have = (recorded.get("config") or {}).get("model")
    if not isinstance(have, dict):
        raise RcgError(f"{tokens_name} does not record its tokenizer's config (identity.tokenizer.config.model)")
    try:
        trained = infer_vqgan_config(embedded)
    except RcgError as exc:
        raise RcgError(f"{path}: vqgan.*: {exc}") from None
    diffs = [f"{k} {list(v) if isinstance(v, tuple) else v} (store's tokenizer: {have[k]})" for k, v in trained.items()
             if k in have and (list(v) if isinstance(v, tuple) else v) != have[k]]
    if diffs:
        raise RcgError(f"this MAGE was trained on another tokenizer than the one {tokens_name} was made with: "
                       + ", ".join(diffs))
    if not (Path(tokenizer_path).is_file() and file_sha256(tokenizer_path) == recorded.get("sha256")):
        log(f"warning: {tokenizer_path} is not the tokenizer {tokens_name} was made with; "
            "checked the embedded VQGAN's architecture only")
        return "architecture"
    if weights_sha256(embedded) != weights_sha256(load_model_file(tokenizer_path, VQGAN_FORMAT)["state_dict"]):
        raise RcgError(f"this MAGE was trained on another tokenizer than the one {tokens_name} was made with "
                       "(same architecture, different weights)")
    return "weights"


ARCH = ("vocab", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
        "mlp_ratio", "grid_conv")


def load_official_mage_model(path: Path, model_kwargs: dict, reps_identity: dict, reps_name: str,
                             tokens_identity: dict, tokens_name: str, tokenizer_path: Path) -> tuple[MAGE, dict]:
    """An official MAGE file as a ready model in eval mode: (MAGE, a summary naming the file and its checks), after
    checking that it is the layout of the generator ``model_kwargs`` builds (RCG's file for ``rep``, LTH14/mage's
    unconditional one for ``none``) and the architecture they ask for (MAGE kwargs the stage built from
    ``pixel.model`` and the stores: codebook, token count, rep size), that its embedded VQGAN made the stores'
    tokens and, for ``rep``, that its embedded encoder made the stores' reps."""
    conditioning, key = model_kwargs["conditioning"], f"pixel.checkpoints.{model_kwargs['conditioning']}"
    sd = read_official_mage(path)
    if (layout := official_layout(sd)) != conditioning:
        raise RcgError(f"{key}: {path} is {LAYOUTS[layout]}, not the {conditioning!r} generator's file: "
                       f"set it as pixel.checkpoints.{layout}")
    try:
        config, state, encoder, vqgan = convert_official_mage(
            sd, rep_dim=model_kwargs["rep_dim"], num_heads=model_kwargs["num_heads"],
            decoder_num_heads=model_kwargs["decoder_num_heads"])
    except RcgError as exc:
        raise RcgError(f"{path}: {exc}") from None
    keys = ARCH + ("codebook_size", "seq_len", "rep_dim", "conditioning")
    diffs = [f"{k} {model_kwargs[k]} (file: {config[k]})" for k in keys if model_kwargs[k] != config[k]]
    if diffs:
        hint = ("; official MAGE files have no grid convolution: set pixel.model.grid_conv: 0"
                if model_kwargs["grid_conv"] != config["grid_conv"] else "")
        raise RcgError(f"{key} {path} does not match pixel.model and the stores: {', '.join(diffs)}{hint}")
    checks = {}
    if conditioning == "rep":
        checks["encoder_check"] = check_official_encoder(encoder, reps_identity, reps_name, path, model_name="MAGE")
    checks["vqgan_check"] = check_official_vqgan(vqgan, tokens_identity, tokens_name, tokenizer_path, path)
    model = MAGE(**model_kwargs)  # the file's architecture with our training-only settings (dropout, masking)
    model.load_state_dict(state, strict=True)
    return model.eval(), {"source": "official", "checkpoint": str(path), "sha256": file_sha256(path), **checks}
