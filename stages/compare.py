"""Stage ``compare``: every setting's scores in one table -> ``metrics/compare.json``, ``metrics/compare.md``.

The analogue, at our scale, of the paper's Table 1 (unconditional baseline vs RCG) and Table 9(a) (oracle reps,
RDM reps, class labels, cluster labels). Rows are the settings whose ``metrics/score/<setting>.json`` exists, in
that order, then ``real`` (the held-out images scored like samples: the floor); a column appears when some row has
it (Inception's and DINOv2's only when their weights were given, the judge's only where labels exist).
"""

from __future__ import annotations

import json

from pipeline.core.artifacts import atomic_file, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.core.progress import log

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["score.spaces", "score.inception_weights", "score.dinov2_weights", "score.prc_k", "sample.settings"]

ORDER = ("baseline", "rcg", "rcg_cfg", "oracle", "class", "cluster")
REAL_ROW = "real"  # pipeline.core.config.REAL_ROW: the held-out images, the floor no generator beats (last row)
SPACES = ("judge", "encoder", "ssl_judge", "inception", "dinov2")  # pipeline.eval.fidelity.SPACES (no torch here)
HEADLINES = ("judge", "ssl_judge", "inception", "dinov2", "encoder")  # the first scored one gives precision/recall


def raised(space_scores: dict) -> list[str]:
    """The warnings one space's figures carry (pipeline.eval.fidelity.raised, without importing torch)."""
    return [name for name, on in space_scores.get("warnings", {}).items() if on]
NOTES = {
    "judge": "judge FID / IS: FID on the judge classifier's penultimate features, IS on its class probabilities "
             "(a space RCG is not conditioned on: the headline)",
    "encoder": "rep FD: Fréchet distance in the encoder's representation space; it favours the rep-conditioned "
               "generators (rcg, rcg_cfg, oracle)",
    "ssl_judge": "ssl FD: Fréchet distance in the ssl_judge's features, a second self-supervised encoder (its own "
                 "weights, seed and crops; beside a ViT encoder another architecture; no labels) that RCG is not "
                 "conditioned on",
    "inception": "Inception FID / IS: torch-fidelity's Inception v3",
    "dinov2": "DINOv2 FD: Fréchet distance in DINOv2 ViT-L/14 CLS features (Stein et al. 2023; EDM2's FD_DINOv2)",
}


def columns(headline: str) -> list[tuple[str, str, str | None, str]]:
    """(key, header, space or None for the setting's own fields, field)."""
    return [("judge_fid", "judge FID", "judge", "fid"), ("judge_is", "judge IS", "judge", "isc"),
            ("precision", f"precision ({headline})", headline, "precision"),
            ("recall", f"recall ({headline})", headline, "recall"),
            ("ssl_fd", "ssl FD", "ssl_judge", "fd"), ("rep_fd", "rep FD", "encoder", "fd"),
            ("inception_fid", "Inception FID", "inception", "fid"), ("inception_is", "Inception IS", "inception", "isc"),
            ("dinov2_fd", "DINOv2 FD", "dinov2", "fd"),
            ("num_samples", "samples", None, "num_samples"), ("sample_seconds", "sample s", None, "sample_seconds"),
            ("score_seconds", "score s", None, "seconds")]


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "num_samples":
        return str(value)
    if key.endswith("seconds"):
        return f"{value:.1f}"
    return f"{value:.4g}"


def table(rows: dict[str, dict], cols: list[tuple[str, str, str | None, str]]) -> str:
    lines = ["| setting | " + " | ".join(c[1] for c in cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(c[0], row[c[0]]) for c in cols) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def run(params: Params) -> dict:
    settings = ([s for s in ORDER if s in params.sample.settings] + [s for s in params.sample.settings if s not in ORDER]
                + [REAL_ROW])
    scores = {}
    for s in settings:
        path = params.paths.metrics / "score" / f"{s}.json"
        if path.is_file():
            scores[s] = json.loads(path.read_text())
    if not scores:
        raise RcgError(f"no scores in {params.paths.metrics / 'score'}: run `rcg score SETTING` first")
    spaces = [s for s in SPACES if any(s in sc for sc in scores.values())]  # what was scored
    headline = next(s for s in HEADLINES if s in spaces)
    cols = columns(headline)
    rows = {name: {key: (sc.get(space) or {}).get(field) if space else sc.get(field) for key, _, space, field in cols}
            for name, sc in scores.items()}
    cols = [c for c in cols if any(row[c[0]] is not None for row in rows.values())]
    rows = {name: {c[0]: row[c[0]] for c in cols} for name, row in rows.items()}
    text = table(rows, cols)
    references = sorted({f"{space}: {sc[space]['reference']}" for sc in scores.values() for space in spaces if space in sc})
    warned = [f"{name}/{space}: {', '.join(raised(sc[space]))} ({sc[space]['num_samples']} samples)"
              for name, sc in scores.items() for space in spaces if space in sc and raised(sc[space])]
    notes = [NOTES[s] for s in spaces] + [f"reference ({'; '.join(references)}), "
                                           f"precision/recall with k = {params.score.prc_k}"]
    if REAL_ROW in scores:
        notes.append(f"{REAL_ROW}: {scores[REAL_ROW]['num_samples']} held-out images (the val split) scored like a "
                     "generator's samples: the floor no setting is expected to beat")
    notes += [f"warning: {w}" for w in warned]
    md = "# Samples scored per setting\n\n" + text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    flat = {name: {k: v for k, v in row.items() if v is not None} for name, row in rows.items()}  # "-" cells: absent
    write_json(params.paths.metrics / "compare.json", {"headline": headline, **flat})
    with atomic_file(params.paths.metrics / "compare.md") as tmp:
        tmp.write_text(md)
    log(text)
    for w in warned:
        log(f"warning: {w}")
    return {"output": str(params.paths.metrics / "compare.md"), "settings": list(rows)}
