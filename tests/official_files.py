"""Files in the on-disk layouts of the official checkpoints (../shared/reference/manifests/), made from our models
at any size: what the import tests and the DVC run with every checkpoint imported read.

MoCo v3 ``vit-b-300ep.pth.tar``, RCG's RDM ``checkpoint-last.pth``, ``vqgan_jax_strongaug.ckpt``, RCG's
rep-conditioned MAGE and LTH14/mage's unconditional MAGE; each maker writes ``path`` and returns it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.models.diffusion import GaussianDiffusion
from pipeline.models.encoder import MoCoViT
from pipeline.models.mage import MAGE
from pipeline.models.official.mage import REP_SLOT, official_unused_shapes
from pipeline.models.rdm import RDM
from pipeline.models.official.rdm import ema_shadow_name
from pipeline.models.vqgan import VQGAN


def mocov3_file(path: Path, encoder: MoCoViT) -> Path:
    """A DDP-wrapped MoCo_ViT: the base encoder, a momentum encoder one off from it (so that importing the wrong
    one shows) and a predictor."""
    state = encoder.state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in state.items()}
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()})
    sd.update({"module.predictor.0.weight": torch.randn(64, 16), "module.predictor.3.weight": torch.randn(16, 64)})
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": None}, path)
    return path


def rdm_file(path: Path, rdm: RDM, encoder_state: dict, ema_offset: float = 0.5) -> Path:
    """main_rdm's save dict: the schedule buffers, the raw MLP, LitEma shadows ``ema_offset`` off from it (the
    weights an import must use), the frozen encoder it was trained with, the class embedder; ``args`` a Namespace."""
    diffusion = GaussianDiffusion()
    sd = {"betas": diffusion.betas.clone(), "alphas_cumprod": diffusion.alphas_cumprod.clone()}
    sd.update({"model.diffusion_model." + k: v.clone() for k, v in rdm.net.state_dict().items()})
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(500, dtype=torch.int32)
    sd.update({ema_shadow_name(k): v.detach() + ema_offset for k, v in rdm.net.named_parameters()})
    sd.update({"pretrained_encoder." + k: v.clone() for k, v in encoder_state.items()})
    sd["cond_stage_model.embedding.weight"] = rdm.cond_stage_model.embedding.weight.detach().clone()
    torch.save({"model": sd, "model_ema": None, "epoch": 199, "args": argparse.Namespace(blr=1e-6)}, path)
    return path


def vqgan_file(path: Path, vqgan: VQGAN) -> Path:
    """The released VQGAN is a bare state dict (no 'state_dict' wrapper)."""
    torch.save(vqgan.state_dict(), path)
    return path


def _mage_state(mage: MAGE) -> dict:
    """``mage``'s state with the parameters the official forward never reads (random: they must not matter)."""
    sd = dict(mage.state_dict())
    config = {"embed_dim": mage.token_emb.word_embeddings.embedding_dim,
              "decoder_embed_dim": mage.decoder_embed.out_features, "seq_len": mage.seq_len}
    sd.update({k: torch.randn(s) for k, s in official_unused_shapes(config).items()})
    return sd


def rep_mage_file(path: Path, mage: MAGE, encoder_state: dict, vqgan_state: dict) -> Path:
    """RCG's rep-conditioned MAGE (main_mage with --use_rep): the whole module, with the frozen MoCo v3 encoder and
    VQGAN it embeds, under 'model'."""
    sd = _mage_state(mage)
    sd.update({f"pretrained_encoder.{k}": v for k, v in encoder_state.items()})
    sd.update({f"vqgan.{k}": v for k, v in vqgan_state.items()})
    torch.save({"model": sd, "model_ema": None, "epoch": 1, "args": argparse.Namespace(temp=6.0)}, path)
    return path


def uncond_mage_file(path: Path, mage: MAGE, vqgan_state: dict) -> Path:
    """LTH14/mage's unconditional MAGE (models_mage.py): ``mage``'s transformer without RCG's rep slot
    (``fake_latent``, ``latent_prior_proj``) and without an encoder, with the VQGAN it embeds, under 'model'."""
    sd = {k: v for k, v in _mage_state(mage).items() if k not in REP_SLOT}
    sd.update({f"vqgan.{k}": v for k, v in vqgan_state.items()})
    torch.save({"model": sd, "optimizer": {}, "epoch": 1599, "args": argparse.Namespace(mask_ratio_mu=0.55)}, path)
    return path
