"""Every published PCC whose inputs are committed, recomputed from them to 1e-12.

SmolLM2 (``docs/_static/results/smollm2``): per-prompt scores of every method in ``parts/``; the
calibrated method takes, per component type, the scores of the rule set the JSON records as
chosen (the page's PCCs and each calibration-study run's held-out agreements), and those choices
(both defaults, every study run) are made again from the shipped calibration-pool scores. The IOI runs of
the tiny models and of the calibration-real page: every prompt's scores (``ioi_scores.npz``) and
the prompt-averaged maps. The tiny models' edge cells: the per-edge scores of every
method and convention in ``edges_scores.npz``. The JSONs whose scores are not shipped are
listed in :data:`NOT_SHIPPED` with the reason; a test checks that every PCC of every results
JSON is either recomputed here or listed there, and that the page showing it says so.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.published_fields import assert_every_field_accounted_for

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "_static" / "results"
KINDS = ("resid", "attn", "mlp")
EDGE_INPUTS = ("q", "k", "v", "mlp", "logits")
DOCS = RESULTS.parents[1]
NOT_SHIPPED = {  # results JSON (glob) and agreement fields -> (page that shows them, reason)
    "edges-smollm2-135m-*/edges_results.json": (
        "results_edges.md", "the per-edge scores of the SmolLM2-135M cells (70,651 and more edges, sampled exact "
        "patching) were not saved when they were measured, and rerunning them takes hours on a CPU"),
    "edges-gemma3-270m-*/edges_results.json": (
        "results_edges.md", "the Gemma-3 270M cell ships its per-edge scores (edges_scores.npz) but not the sampled "
        "exact edge scores its PCCs compare with"),
    "gemma3/*.json": (
        "results_gemma3.md", "the per-prompt scores of Gemma-3 270M are not saved by scripts/gemma3_results.py "
        "and scripts/gemma3_qk_norms.py (its weights are not redistributed)"),
    "calibration/*.json": (
        "results_calibration.md", "scripts/calibration_eval.py saves the held-out agreements, not the candidates' "
        "per-prompt scores they come from"),
}
NOT_SHIPPED_NOTE = "are not shipped"  # the words each page listed in NOT_SHIPPED uses for it
RECOMPUTED = ("smollm2/results.json#*/pcc", "smollm2/results.json#*/calibration/study/runs/held_out",
              "ioi-tiny-*/ioi_results.json#pcc_per_prompt", "ioi-tiny-*/ioi_results.json#pcc_mean_map",
              "edges-tiny-*/edges_results.json#conventions/*/methods/*/pcc_vs_exact",
              "calibration-real/*/ioi_results.json#pcc_per_prompt", "calibration-real/*/ioi_results.json#pcc_mean_map",
              # with their bootstrap intervals: tests/test_published_intervals.py
              "ioi-tiny-*/ioi_results.json#agreement_with_ap/*",
              "calibration-real/*/*_results.json#agreement_with_ap/*")
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


IOI_FOLDERS = ["ioi-tiny-gpt2-ioi", "ioi-tiny-llama-ioi"] + sorted(
    str(p.parent.relative_to(RESULTS)) for p in RESULTS.glob("calibration-real/*/ioi_results.json"))


def check_ioi_per_prompt(summary: dict, saved) -> int:
    """Every ``pcc_per_prompt`` of an IOI run, recomputed over the real (non-pad) positions of every
    prompt's saved scores (``ioi_scores.npz``). Returns the count checked."""
    valid = saved["valid"].astype(bool)
    assert valid.shape[0] == summary["config"]["n_prompts"]
    checked = 0
    for kind in KINDS:
        reference = saved[f"AP/{kind}"]
        keep = np.broadcast_to(valid[:, None, :], reference.shape)
        for method, published in summary["pcc_per_prompt"][kind].items():
            assert abs(published - _pcc(saved[f"{method}/{kind}"][keep], reference[keep])) < 1e-12, (kind, method)
            checked += 1
    return checked


@pytest.mark.parametrize("folder", IOI_FOLDERS)
def test_ioi_per_prompt_pccs_recomputed_from_the_saved_scores(folder):
    summary = json.loads((RESULTS / folder / "ioi_results.json").read_text())
    with np.load(RESULTS / folder / "ioi_scores.npz") as saved:
        assert check_ioi_per_prompt(summary, saved) >= 3 * 3


def test_a_perturbed_ioi_score_fails_the_per_prompt_check(tmp_path):
    """The check can fail: one saved score moved by 1e-6 of the scores' spread breaks a PCC."""
    summary = json.loads((RESULTS / IOI_FOLDERS[0] / "ioi_results.json").read_text())
    with np.load(RESULTS / IOI_FOLDERS[0] / "ioi_scores.npz") as saved:
        arrays = {key: saved[key] for key in saved.files}
    scores = arrays["RelP/mlp"].astype(np.float64)
    where = np.unravel_index(int(np.argmax(np.abs(scores))), scores.shape)
    scores[where] += 1e-6 * scores.std()
    arrays["RelP/mlp"] = scores
    np.savez(tmp_path / "ioi_scores.npz", **arrays)
    with np.load(tmp_path / "ioi_scores.npz") as perturbed, pytest.raises(AssertionError):
        check_ioi_per_prompt(summary, perturbed)


@pytest.mark.parametrize("folder", IOI_FOLDERS)
def test_ioi_mean_map_pccs_recomputed_from_the_saved_maps(folder):
    summary = json.loads((RESULTS / folder / "ioi_results.json").read_text())
    maps = summary["mean_maps"]
    checked = 0
    for kind in KINDS:
        for method, published in summary["pcc_mean_map"][kind].items():
            assert abs(published - _pcc(maps[method][kind], maps["AP"][kind])) < 1e-12, (kind, method)
            checked += 1
    assert checked >= 3 * 3


def _held_out_scores(task: str, result: dict, choices: dict, scores: dict, layers: int) -> dict:
    """``{kind: (N, L, P)}`` of a calibration-study run's choice per component type."""
    parts, out = RESULTS / "smollm2" / "parts", {}
    for k, kind in enumerate(KINDS):
        name = choices[kind]
        if name in SAME_AS:
            chosen = scores[SAME_AS[name]]
        else:
            chosen = np.concatenate([c["scores"] for c in _chunks(parts, task, result["n"], f"_cand_{name}")])
        out[kind] = chosen[:, k * layers:(k + 1) * layers]
    return out


@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_smollm2_calibration_study_agreements_recomputed_from_the_per_prompt_scores(task):
    """Each study run's held-out PCC of AtP, the preset and its own choice, and calibrated - AtP."""
    result = json.loads((RESULTS / "smollm2" / "results.json").read_text())[task]
    study = result["calibration"]["study"]
    assert study["n_eval"] == result["n"]
    assert {run["default"] for run in study["runs"]} == {"best-preset", "gradient"}  # both, from the same scores
    scores, layers = _smollm2_scores(task, result)
    checked = 0
    for run in study["runs"]:
        chosen = _held_out_scores(task, result, run["choices"], scores, layers)
        for kind, cell in run["held_out"].items():
            k = KINDS.index(kind)
            ap = scores["AP"][:, k * layers:(k + 1) * layers]
            expected = {"AtP": _pcc(scores["AtP"][:, k * layers:(k + 1) * layers], ap),
                        "RelP (preset)": _pcc(scores["RelP"][:, k * layers:(k + 1) * layers], ap),
                        "RelP+AH": _pcc(scores["RelP+AH"][:, k * layers:(k + 1) * layers], ap),
                        "RelP (calibrated)": _pcc(chosen[kind], ap)}
            for method, value in expected.items():
                assert abs(cell[method] - value) < 1e-12, (run["size"], run["draw"], kind, method)
            assert abs(cell["diff"] - (expected["RelP (calibrated)"] - expected["AtP"])) < 1e-12
            checked += 1
    assert checked == len(study["runs"]) * len(KINDS) and checked > 0


POOL_DRAWS = 5
"""Subsets per calibration size below the pool size in SmolLM2-135M's study (``_real_model_calibration.DRAWS``)."""


def _pool_candidate_scores(task: str, result: dict, with_evaluated_metric: bool):
    """The library's :class:`CandidateScores` of the committed calibration-pool chunks, as the script builds
    them: one layer per component, AP effects up to 100 float32 epsilons of the largest |metric| (of the pool,
    and of the evaluated pairs too for the study, which scores both) count as none."""
    import torch

    from captum_relp import RuleSet
    from captum_relp.calibration import CandidateScores

    parts = RESULTS / "smollm2" / "parts"
    files = [parts / f"{task}_pool_{start:03d}.npz" for start in range(0, result["n_pool"], 10)]
    assert all(f.exists() for f in files), [f.name for f in files if not f.exists()]
    chunks = [np.load(f) for f in files]
    names = result["calibration"]["study"]["candidates"]
    keys = {name: SAME_AS.get(name, f"cand:{name}") for name in names}
    arrays = {key: np.concatenate([c[key] for c in chunks]) for key in ["AP", *keys.values()]}
    assert arrays["AP"].shape[0] == result["n_pool"]
    metric = np.concatenate([c["metric"] for c in chunks])
    if with_evaluated_metric:
        metric = np.concatenate([metric, *[c["metric"] for c in _chunks(parts, task, result["n"])]])
    tolerance = 100 * float(np.finfo(np.float32).eps) * max(float(np.abs(metric).max()), 1e-30)
    layers = arrays["AP"].shape[1]

    def per_layer(values):
        return [torch.from_numpy(values[:, c]) for c in range(layers)]

    return CandidateScores.from_layer_scores(
        [RuleSet(name) for name in names], per_layer(arrays["AP"]),
        {name: per_layer(arrays[key]) for name, key in keys.items()},
        [kind for kind in KINDS for _ in range(layers // len(KINDS))], tolerance=tolerance, auto_groups=True)


def choice_mismatches(result: dict, pool, both) -> tuple:
    """The page's choices (first 20 pool pairs, both defaults) and every study run's choices and decisions,
    chosen again with ``choose_rules`` from the pool scores ``pool`` (pool metric) and ``both`` (the study's):
    ``(choices checked, [(size, draw, default) that differ])``."""
    import warnings

    import torch

    from captum_relp.calibration import choose_rules

    cal, study = result["calibration"], result["calibration"]["study"]
    checked, problems = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for default, published in ((cal["default"], cal["choices"]), ("gradient", cal["gradient"]["choices"])):
            checked += 1
            if choose_rules(pool.rows(torch.arange(20)), default=default).choices != published:
                problems.append((20, 0, default))
        gen, runs = torch.Generator().manual_seed(0), iter(study["runs"])
        for size in sorted({run["size"] for run in study["runs"]}):
            for draw in range(POOL_DRAWS if size < study["n_pool"] else 1):
                rows = torch.arange(size) if draw == 0 else torch.randperm(study["n_pool"], generator=gen)[:size]
                for default in study["defaults"]:
                    run = next(runs)
                    assert (run["size"], run["draw"], run["default"]) == (size, draw, default)
                    chosen = choose_rules(both.rows(rows), n_bootstrap=1000, default=default)
                    decisions = {g: s["decision"] for g, s in chosen.selection.items()}
                    if chosen.choices != run["choices"] or decisions != run["decisions"]:
                        problems.append((size, draw, default))
                    checked += 1
        assert next(runs, None) is None
    return checked, problems


@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_smollm2_choices_recomputed_from_the_shipped_pool_scores(task):
    """The page's rules (best-preset default, the gradient's beside it) and every study run's choices."""
    result = json.loads((RESULTS / "smollm2" / "results.json").read_text())[task]
    study = result["calibration"]["study"]
    assert result["calibration"]["default"] == "best-preset" and study["defaults"] == ["best-preset", "gradient"]
    assert study["n_pool"] == result["n_pool"] and result["calibration"]["n_pool"] == result["n_pool"]
    checked, problems = choice_mismatches(result, _pool_candidate_scores(task, result, False),
                                          _pool_candidate_scores(task, result, True))
    assert problems == [] and checked == 2 + len(study["runs"])


def test_a_changed_pool_score_fails_the_choice_check():
    """The check can fail: a candidate given AP's own scores on the pool is chosen instead."""
    result = json.loads((RESULTS / "smollm2" / "results.json").read_text())["ioi"]
    pool, both = (_pool_candidate_scores("ioi", result, flag) for flag in (False, True))
    name = next(n for n in result["calibration"]["study"]["candidates"]
                if n not in SAME_AS and n not in result["calibration"]["choices"].values())
    for scores in (pool, both):
        for data in scores.data.values():
            data.scores[name] = data.reference.clone()
    _, problems = choice_mismatches(result, pool, both)
    assert (20, 0, "best-preset") in problems and (20, 0, "gradient") in problems


def _input_kind(edge: str) -> str:
    """``q``, ``k``, ``v``, ``mlp`` or ``logits``: the downstream input of an edge ``up->down``."""
    down = edge.split("->")[1]
    return down.split("<")[1].rstrip(">") if "<" in down else ("logits" if down == "logits" else "mlp")


def check_edge_cell(cell: dict, saved) -> int:
    """Every ``pcc_vs_exact`` (all edges and per downstream input) of an edges cell, recomputed from
    its saved per-edge scores; ``nan`` only where one side is constant. Returns the count checked."""
    checked = 0
    for convention, entry in cell["conventions"].items():
        edges = saved[f"{convention}/edges"]
        assert len(edges) == entry["n_edges"] == len(set(edges.tolist())), convention
        methods = {key.split("/", 1)[1] for key in saved.files if key.startswith(f"{convention}/")} - {"edges"}
        assert methods == set(entry["methods"]), convention
        kinds = np.array([_input_kind(str(edge)) for edge in edges])
        assert set(kinds) == set(EDGE_INPUTS)
        exact = saved[f"{convention}/exact"]
        assert exact.dtype == np.float64 and exact.shape == (len(edges),)
        for method, published in entry["methods"].items():
            mine = saved[f"{convention}/{method}"]
            for kind, value in published["pcc_vs_exact"].items():
                rows = np.ones(len(edges), bool) if kind == "all" else kinds == kind
                if math.isnan(value):
                    assert mine[rows].std() == 0 or exact[rows].std() == 0, (convention, method, kind)
                else:
                    assert abs(value - _pcc(mine[rows], exact[rows])) < 1e-12, (convention, method, kind)
                checked += 1
    return checked


EDGE_CELLS = sorted(p.parent.name for p in RESULTS.glob("edges-tiny-*/edges_scores.npz"))


def test_the_tiny_edge_cells_ship_their_scores():
    tiny = sorted(p.parent.name for p in RESULTS.glob("edges-tiny-*/edges_results.json"))
    assert tiny and EDGE_CELLS == tiny


@pytest.mark.parametrize("cell", EDGE_CELLS)
def test_edge_pccs_recomputed_from_the_saved_edge_scores(cell):
    data = json.loads((RESULTS / cell / "edges_results.json").read_text())
    with np.load(RESULTS / cell / "edges_scores.npz") as saved:
        checked = check_edge_cell(data, saved)
    assert checked == sum(len(entry["methods"]) * (1 + len(EDGE_INPUTS)) for entry in data["conventions"].values())


def test_a_perturbed_edge_score_fails_the_check(tmp_path):
    """The check can fail: one saved score moved by 1e-6 of the scores' spread breaks a PCC."""
    cell = EDGE_CELLS[0]
    data = json.loads((RESULTS / cell / "edges_results.json").read_text())
    with np.load(RESULTS / cell / "edges_scores.npz") as saved:
        arrays = {key: saved[key] for key in saved.files}
    key = f"{next(iter(data['conventions']))}/relp"
    arrays[key] = arrays[key].copy()
    arrays[key][int(np.argmax(np.abs(arrays[key])))] += 1e-6 * arrays[key].std()
    np.savez(tmp_path / "edges_scores.npz", **arrays)
    with np.load(tmp_path / "edges_scores.npz") as perturbed, pytest.raises(AssertionError):
        check_edge_cell(data, perturbed)


def test_every_published_agreement_is_recomputed_or_listed_as_not_shipped():
    assert_every_field_accounted_for(r"pcc|held_out", RECOMPUTED, NOT_SHIPPED)


@pytest.mark.parametrize("pattern", sorted(NOT_SHIPPED))
def test_the_page_of_each_unshipped_result_says_its_scores_are_not_shipped(pattern):
    page, reason = NOT_SHIPPED[pattern]
    assert reason
    assert NOT_SHIPPED_NOTE in (DOCS / page).read_text(), (page, NOT_SHIPPED_NOTE)
