"""Pairing ``tokens.zarr`` with ``reps.zarr``: row ``i``, view ``v`` of both must be the same pixels.

Both stores record the view recipe and the shard index they were computed on; the pixel generator trains on
(reps[i, v], tokens[i, v]) pairs, so it refuses a pair of stores that disagree on either.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.artifacts import file_sha256
from pipeline.core.errors import RcgError
from pipeline.data.stores import open_store


def check_tokenizer(tokens_identity: dict, tokens_path: str | Path, tokenizer_path: str | Path) -> None:
    """Raise RcgError unless the token store with identity ``tokens_identity`` was made by ``tokenizer_path``."""
    recorded = tokens_identity["tokenizer"]["sha256"]
    if recorded != file_sha256(tokenizer_path):
        raise RcgError(f"{tokens_path} was made by another tokenizer than {tokenizer_path} "
                       f"(its sha256 is {recorded[:12]}...); rerun `rcg tokenize`")


def check_aligned(tokens_path: str | Path, reps_path: str | Path,
                  tokenizer_path: str | Path | None = None) -> tuple[int, int]:
    """Raise RcgError naming what differs unless both stores describe the same images and views (and, given the
    tokenizer model file a consumer will decode with, unless the tokens were made by that file); -> (N, V)."""
    tokens, reps = open_store(Path(tokens_path), "tokens"), open_store(Path(reps_path), "reps")
    have_t, have_r = tokens.attrs.asdict()["identity"], reps.attrs.asdict()["identity"]
    if tokenizer_path is not None:
        check_tokenizer(have_t, tokens_path, tokenizer_path)
    differ = [k for k in ("views", "index") if have_t.get(k) != have_r.get(k)]
    if differ:
        details = "; ".join(f"{k}: tokens {have_t.get(k)!r} vs reps {have_r.get(k)!r}" for k in differ)
        raise RcgError(f"{tokens_path} and {reps_path} were not built from the same {' and '.join(differ)} "
                       f"(rerun `rcg encode` and `rcg tokenize` with the same params): {details}")
    n_v_t, n_v_r = tuple(tokens["tokens"].shape[:2]), tuple(reps["reps"].shape[:2])
    if n_v_t != n_v_r:
        raise RcgError(f"{tokens_path} holds [N, V] = {list(n_v_t)} but {reps_path} holds {list(n_v_r)}")
    return n_v_t
