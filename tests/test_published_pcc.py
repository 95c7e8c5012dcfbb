"""Every published PCC whose inputs are committed, recomputed from them to 1e-12.

SmolLM2 (``docs/_static/results/smollm2``): per-prompt scores of every method in ``parts/``; the
calibrated method takes, per component type, the scores of the rule set the JSON records as
chosen. The tiny models' IOI runs: the prompt-averaged maps. The edges and Gemma-3 JSONs keep
no per-prompt or per-edge scores, so their PCCs are not recomputed here.
"""
import json
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "_static" / "results"
KINDS = ("resid", "attn", "mlp")
SAME_AS = {"gradient": "AtP", "relp": "RelP", "relp-ah": "RelP+AH"}  # candidates scored by a method's own pass


def _pcc(x, y) -> float:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))


def _chunks(parts: Path, task: str, n: int, suffix: str = ""):
    files = [parts / f"{task}_eval_{start:03d}{suffix}.npz" for start in range(0, n, 10)]
    assert all(f.exists() for f in files), [f.name for f in files if not f.exists()]
    return [np.load(f) for f in files]


def _smollm2_scores(task: str, result: dict):
    """``{method: (N, 3 L, P)}`` from the committed chunks, the calibrated method included."""
    parts = RESULTS / "smollm2" / "parts"
    chunks = _chunks(parts, task, result["n"])
    scores = {m: np.concatenate([c[m] for c in chunks]) for m in ("AP", "AtP", "RelP", "RelP+AH")}
    assert scores["AP"].shape[0] == result["n"]
    layers = scores["AP"].shape[1] // len(KINDS)
    pieces = []
    for k, kind in enumerate(KINDS):
        name = result["calibration"]["choices"][kind]
        if name in SAME_AS:
            chosen = scores[SAME_AS[name]]
        else:
            chosen = np.concatenate([c["scores"] for c in _chunks(parts, task, result["n"], f"_cand_{name}")])
        pieces.append(chosen[:, k * layers:(k + 1) * layers])
    scores["RelP (calibrated)"] = np.concatenate(pieces, axis=1)
    return scores, layers


@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_smollm2_pccs_recomputed_from_the_per_prompt_scores(task):
    result = json.loads((RESULTS / "smollm2" / "results.json").read_text())[task]
    scores, layers = _smollm2_scores(task, result)
    checked = 0
    for k, kind in enumerate(KINDS):
        part = {m: v[:, k * layers:(k + 1) * layers] for m, v in scores.items()}
        for method, published in result["pcc"]["per_prompt"][kind].items():
            assert abs(published[0] - _pcc(part[method], part["AP"])) < 1e-12, (kind, method)
            averaged = result["pcc"]["prompt_averaged"][kind][method][0]
            assert abs(averaged - _pcc(part[method].mean(0), part["AP"].mean(0))) < 1e-12, (kind, method)
            checked += 1
    assert checked == len(KINDS) * 4


@pytest.mark.parametrize("model", ["tiny-gpt2-ioi", "tiny-llama-ioi"])
def test_tiny_ioi_mean_map_pccs_recomputed_from_the_saved_maps(model):
    summary = json.loads((RESULTS / f"ioi-{model}" / "ioi_results.json").read_text())
    maps = summary["mean_maps"]
    checked = 0
    for kind in KINDS:
        for method, published in summary["pcc_mean_map"][kind].items():
            assert abs(published - _pcc(maps[method][kind], maps["AP"][kind])) < 1e-12, (kind, method)
            checked += 1
    assert checked >= 3 * 3
