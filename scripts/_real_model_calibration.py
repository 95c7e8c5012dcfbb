"""Calibrated rules on SmolLM2-135M from the checkpointed chunks (``make_results.py --real-model``).

AP and every default candidate were measured once, at the task's positions, on the
calibration pool and on the evaluated pairs (:mod:`_real_model_runs`; the pool chunks are
shipped, so the choices can be made again from the files). The rules are chosen by the
library's selection step, :func:`~captum_relp.choose_rules` (noise-aware paired bootstrap,
1000 resamples), on the first ``CALIBRATION_PAIRS`` pool pairs, with the library's default
(``"best-preset"``: per component type the best of the presets ``gradient``, ``relp`` and
``relp-ah`` on those pairs is kept unless a candidate beats it beyond the noise) and, from the
same scores, with the gradient as default: that is :func:`~captum_relp.calibrate_rules` with AP
read at the task's positions instead of every position. The calibration-size study reuses
``calibration_eval.study`` (both defaults): sizes 10, 20, 50 (100 when the pool has them), the
evaluated pairs held out.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

from calibration_eval import DEFAULTS, study
from captum_relp.calibration import CandidateScores, choose_rules, default_candidates
from captum_relp.models import COMPONENT_KINDS as KINDS

CALIBRATION_PAIRS = 20
"""The library's default calibration size."""
SIZES = (10, 20, 50, 100)
DRAWS = 5
LIBRARY_DEFAULT, GRADIENT = DEFAULTS
"""The library's default (``"best-preset"``: the page's calibrated column) and the gradient, kept beside it."""


def candidate_scores(model, pool: Dict, evaluated: Optional[Dict] = None) -> CandidateScores:
    """:class:`CandidateScores` of the pool pairs (then the evaluated pairs, as held-out rows)."""
    splits = [pool] + ([evaluated] if evaluated is not None else [])
    candidates = default_candidates(model)

    def per_layer(key):
        # a candidate never chosen is not scored on the held-out rows: NaN there (never read)
        values = np.concatenate([s["scores"].get(key, np.full_like(s["scores"]["AP"], np.nan)) for s in splits])
        return [torch.from_numpy(values[:, c]) for c in range(values.shape[1])]

    layers = pool["scores"]["AP"].shape[1] // len(KINDS)
    groups = [kind for kind in KINDS for _ in range(layers)]
    metric = np.concatenate([s["metric"] for s in splits])
    tolerance = 100 * float(torch.finfo(torch.float32).eps) * max(float(np.abs(metric).max()), 1e-30)
    return CandidateScores.from_layer_scores(candidates, per_layer("AP"),
                                             {c.name: per_layer(f"cand:{c.name}") for c in candidates}, groups,
                                             tolerance=tolerance, model=model, auto_groups=True)


def chosen_names(model, pool: Dict) -> set:
    """Every candidate that the size study (``calibration_eval.study``'s subsets, both defaults) chooses for some group."""
    n_pool = pool["scores"]["AP"].shape[0]
    scores = candidate_scores(model, pool)
    gen, names = torch.Generator().manual_seed(0), set()
    for size in [s for s in SIZES if s <= n_pool]:
        for draw in range(DRAWS if size < n_pool else 1):
            rows = torch.arange(size) if draw == 0 else torch.randperm(n_pool, generator=gen)[:size]
            for default in DEFAULTS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    names |= set(choose_rules(scores.rows(rows), default=default).choices.values())
    return names


def calibrated(model, pool: Dict, evaluated: Dict) -> Optional[Dict]:
    """Rules chosen on the first 20 pool pairs with the library's default (their scores on the evaluated
    pairs: the page's calibrated column) and with the gradient as default; the size study (both defaults)."""
    n_pool = pool["scores"]["AP"].shape[0]
    if n_pool < CALIBRATION_PAIRS:
        return None
    first = candidate_scores(model, pool).rows(torch.arange(CALIBRATION_PAIRS))
    chosen = {}
    for default in DEFAULTS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen[default] = (choose_rules(first, default=default), [str(w.message) for w in caught])
    rules, caught = chosen[LIBRARY_DEFAULT]
    gradient, gradient_warnings = chosen[GRADIENT]
    layers = pool["scores"]["AP"].shape[1] // len(KINDS)
    scores = np.concatenate([evaluated["scores"][f"cand:{rules.choices[kind]}"][:, k * layers:(k + 1) * layers]
                             for k, kind in enumerate(KINDS)], 1)
    seconds = pool["seconds"]
    per_pair = {k: v / n_pool for k, v in seconds.items()}
    cost = per_pair["AP"] + sum(v for k, v in per_pair.items() if k.startswith("cand:") or k in ("AtP", "RelP", "RelP+AH"))
    sizes = [s for s in SIZES if s <= n_pool]
    both = candidate_scores(model, pool, evaluated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        size_study = study("SmolLM2-135M", "", both, n_pool, sizes, DRAWS, 1000, seconds=sum(seconds.values()),
                           defaults=DEFAULTS)
    return {"default": LIBRARY_DEFAULT, "choices": dict(rules.choices), "summary": rules.summary(), "scores": scores,
            "warnings": caught, "calibration_seconds": cost * CALIBRATION_PAIRS,
            "n_candidates": len(rules.candidates), "study": size_study, "sizes": sizes, "n_pool": n_pool,
            GRADIENT: {"choices": dict(gradient.choices), "summary": gradient.summary(),
                       "warnings": gradient_warnings}}


def study_rows(studies: List[Dict]) -> List[Dict]:
    """Drop the study's per-run summaries (long text) before the JSON record."""
    return [{**s, "runs": [{k: v for k, v in r.items() if k != "summary"} for r in s["runs"]]} for s in studies]
