"""Every published bootstrap interval whose per-prompt inputs are committed, recomputed to 1e-12.

The intervals are percentile intervals over resamples of the prompts drawn from seeded generators,
so they are recomputed exactly, from the files alone:

- ``agreement_with_ap`` of the ``captum-relp ioi`` and ``captum-relp attribute`` runs (the embedded
  models' IOI runs, the calibration-real runs), written by
  :func:`captum_relp.experiments.agreement.agreement_table`: 1000 resamples drawn with ``torch.randint``
  from a ``torch.Generator`` seeded with the run's ``seed``; the PCC over the real (non-pad) positions
  of the resampled prompts; the 2.5 and 97.5 percentiles (linear interpolation) of the finite values.
  ``margin`` is the paired difference to the one method without a margin (AtP), ``loses`` says its
  interval lies below zero. ``task/difference_interval`` of an ``attribute`` run: the interval of the
  mean clean - corrupted metric over the same kind of resamples.
- SmolLM2-135M (``smollm2/results.json``), each ``[value, low, high]`` of ``pcc/per_prompt`` and
  ``pcc/prompt_averaged``: ``bootstrap`` of ``scripts/_real_model.py`` (``numpy.random.default_rng(0)``,
  1000 draws of ``integers(0, n, n)``, ``nanpercentile`` 2.5 and 97.5; neither seed nor count is in the
  JSON, both are that function's defaults). Its calibration study's held-out intervals:
  ``held_out`` of ``scripts/calibration_eval.py`` (the library's resamples with seed 1, 1000 of them).

Each resample's PCC is computed here directly over the entries of the resampled prompts (a prompt
drawn twice counts twice), not through the library's weighted sums. The intervals whose inputs are
not shipped are listed in :data:`NOT_RECOMPUTED` with the reason; a test checks that every interval
of every results JSON is recomputed here or listed there.
"""
import inspect
import json

import numpy as np
import pytest
import torch

from captum_relp.experiments.agreement import agreement_table
from tests.published_fields import assert_every_field_accounted_for
from tests.test_published_pcc import KINDS, RESULTS, SAME_AS, _held_out_scores, _smollm2_scores

RESAMPLES = 1000
"""Resamples of every interval checked here (the library's and the scripts' default)."""
RECOMPUTED = ("ioi-tiny-*/ioi_results.json#agreement_with_ap/*",
              "calibration-real/*/*_results.json#agreement_with_ap/*",
              "calibration-real/*/task_results.json#task/difference_interval",
              "smollm2/results.json#*/calibration/study/runs/held_out/*")
NOT_RECOMPUTED = {  # results JSON (glob) and interval fields -> why the inputs are not shipped
    "calibration/*.json": "scripts/calibration_eval.py saves the held-out agreements, not the per-prompt "
                          "scores they come from",
    "calibration-real/*/*_calibration.json#selection/*": "the run saves the scores of its evaluated pairs "
                                                         "(*_scores.npz), not those of its calibration pairs",
    "edges-*/edges_results.json#conventions/library/intervals": "CPR and CMD intervals over the prompts; the "
                                                                "circuits' per-prompt metrics are not saved",
    "edges-*/edges_results.json#conventions/mib/intervals": "CPR and CMD intervals over the prompts; the "
                                                            "circuits' per-prompt metrics are not saved",
    "edges-*/edges_results.json#conventions/*/exact_sample/*": "PCC intervals over the sampled edges, whose exact "
                                                               "scores are not shipped",
}
SCORED_RUNS = sorted(str(p.parent.relative_to(RESULTS)) for pattern in ("ioi-tiny-*/ioi_results.json",
                     "calibration-real/*/*_results.json") for p in RESULTS.glob(pattern))


def _pccs(x: np.ndarray, y: np.ndarray, keep: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``(len(draws),)``: the PCC of ``x`` and ``y`` over the kept entries of the prompts of each draw.

    ``x``, ``y``, ``keep``: ``(N, entries)``; ``draws``: ``(R, N)`` prompt indices. NaN where one side
    is constant.
    """
    out, everywhere = [], bool(keep.all())
    for rows in np.array_split(draws, max(1, len(draws) // 100)):
        a, b = x[rows].reshape(len(rows), -1), y[rows].reshape(len(rows), -1)
        if everywhere:
            a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        else:
            k = keep[rows].reshape(len(rows), -1).astype(np.float64)
            count = k.sum(1, keepdims=True)
            a = (a - (a * k).sum(1, keepdims=True) / count) * k
            b = (b - (b * k).sum(1, keepdims=True) / count) * k
        saa, sbb = (a * a).sum(1), (b * b).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where((saa > 0) & (sbb > 0), (a * b).sum(1) / np.sqrt(saa * sbb), np.nan))
    return np.concatenate(out)


def _library_draws(n: int, seed: int) -> np.ndarray:
    """``(1 + RESAMPLES, n)``: all prompts, then the resamples the library draws with ``seed``."""
    resamples = torch.randint(n, (RESAMPLES, n), generator=torch.Generator().manual_seed(seed)).numpy()
    return np.concatenate([np.arange(n)[None], resamples])


def _percentiles(values: np.ndarray):
    """The library's interval: ``None`` when under 90% of the resampled values are defined."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < 0.9 * values.size:
        return None
    return np.quantile(finite, [0.025, 0.975]).tolist()


def _differs(published, value) -> bool:
    """Whether a published number (or ``[low, high]``, or ``None``) is not the recomputed one to 1e-12."""
    if published is None or value is None:
        return not (published is None and value is None)
    return not np.allclose(published, value, rtol=0, atol=1e-12)


def agreement_mismatches(results: dict, saved) -> tuple:
    """Every row of ``agreement_with_ap`` (PCC, interval, margin and its interval, loses), recomputed from a
    run's saved per-prompt scores: ``(intervals checked, [(kind, method, field) that differ]``)."""
    valid = saved["valid"].astype(bool)
    checked, problems = 0, []
    for kind, rows in results["agreement_with_ap"].items():
        reference = saved[f"AP/{kind}"].astype(np.float64)
        n = reference.shape[0]
        assert n == results["config"].get("validate", results["config"].get("n_prompts")), kind
        keep = np.broadcast_to(valid[:n, None, :], reference.shape)
        draws = _library_draws(n, results["config"]["seed"])
        values = {m: _pccs(saved[f"{m}/{kind}"][:n].astype(np.float64), reference, keep, draws) for m in rows}
        against = [m for m, row in rows.items() if "margin" not in row]
        assert len(against) == 1, (kind, against)
        for method, row in rows.items():
            v = values[method]
            expected = {"pcc": v[0], "interval": _percentiles(v[1:])}
            if method != against[0]:
                margin = v - values[against[0]]
                expected.update(margin=margin[0], margin_interval=_percentiles(margin[1:]))
                interval = expected["margin_interval"]
                if row["loses"] != (interval is not None and interval[1] < 0):
                    problems.append((kind, method, "loses"))
            assert set(expected) <= set(row), (kind, method)
            problems += [(kind, method, key) for key, value in expected.items() if _differs(row[key], value)]
            checked += sum(1 for key in expected if key.endswith("interval"))
    return checked, problems


def _load_run(folder: str):
    stem = "ioi" if (RESULTS / folder / "ioi_results.json").exists() else "task"
    return json.loads((RESULTS / folder / f"{stem}_results.json").read_text()), RESULTS / folder / f"{stem}_scores.npz"


def _nudged(values: np.ndarray) -> np.ndarray:
    """A float64 copy with its largest score moved by 1e-6 of the scores' spread."""
    values = values.astype(np.float64)
    values[np.unravel_index(int(np.argmax(np.abs(values))), values.shape)] += 1e-6 * values.std()
    return values


def test_the_resample_count_is_the_library_default():
    assert inspect.signature(agreement_table).parameters["n_bootstrap"].default == RESAMPLES


@pytest.mark.parametrize("folder", SCORED_RUNS)
def test_agreement_intervals_recomputed_from_the_saved_scores(folder):
    results, scores = _load_run(folder)
    with np.load(scores) as saved:
        checked, problems = agreement_mismatches(results, saved)
    assert problems == []
    assert checked == sum(2 * len(rows) - 1 for rows in results["agreement_with_ap"].values()) and checked >= 3 * 5


def test_a_perturbed_score_fails_the_agreement_check(tmp_path):
    """The check can fail: one saved score moved by 1e-6 of the scores' spread moves its intervals."""
    results, scores = _load_run(SCORED_RUNS[0])
    with np.load(scores) as saved:
        arrays = {key: saved[key] for key in saved.files}
    arrays["RelP/mlp"] = _nudged(arrays["RelP/mlp"])
    np.savez(tmp_path / "scores.npz", **arrays)
    with np.load(tmp_path / "scores.npz") as perturbed:
        _, problems = agreement_mismatches(results, perturbed)
    assert ("mlp", "RelP", "interval") in problems and ("mlp", "RelP", "margin_interval") in problems
    assert {kind for kind, _, _ in problems} == {"mlp"}


def difference_mismatches(task: dict, seed: int) -> list:
    """``difference_mean`` and ``difference_interval`` of a task run's competence check, recomputed from its
    saved clean and corrupted metric values: the names of those that differ."""
    difference = np.asarray(task["clean_values"], np.float64) - np.asarray(task["corrupted_values"], np.float64)
    assert difference.size == task["n_pairs"]
    means = difference[_library_draws(difference.size, seed)[1:]].mean(1)
    expected = {"difference_mean": difference.mean(),
                "difference_interval": np.quantile(means, [0.025, 0.975]).tolist()}
    return [key for key, value in expected.items() if _differs(task[key], value)]


TASK_RUNS = [f for f in SCORED_RUNS if (RESULTS / f / "task_results.json").exists()]


@pytest.mark.parametrize("folder", TASK_RUNS)
def test_task_difference_interval_recomputed_from_the_saved_metric_values(folder):
    results = json.loads((RESULTS / folder / "task_results.json").read_text())
    assert difference_mismatches(results["task"], results["config"]["seed"]) == []


def test_a_perturbed_metric_value_fails_the_difference_check():
    results = json.loads((RESULTS / TASK_RUNS[0] / "task_results.json").read_text())
    task = dict(results["task"], clean_values=list(results["task"]["clean_values"]))
    task["clean_values"][0] += 1e-6
    assert difference_mismatches(task, results["config"]["seed"]) == ["difference_mean", "difference_interval"]


def _smollm2(task: str) -> tuple:
    """SmolLM2's results of ``task`` and the per-prompt scores of every method: ``(result, scores, layers)``."""
    result = json.loads((RESULTS / "smollm2" / "results.json").read_text())[task]
    return (result, *_smollm2_scores(task, result))


def smollm2_mismatches(result: dict, scores: dict, layers: int) -> tuple:
    """Each ``[value, low, high]`` of the SmolLM2 page's PCC tables, recomputed with the numpy resamples of
    ``scripts/_real_model.py``: ``(intervals checked, [(kind, method, table) that differ])``."""
    n = result["n"]
    rng = np.random.default_rng(0)
    draws = np.stack([np.arange(n)] + [rng.integers(0, n, n) for _ in range(RESAMPLES)])
    checked, problems = 0, []
    for k, kind in enumerate(KINDS):
        part = {m: v[:, k * layers:(k + 1) * layers] for m, v in scores.items()}  # in the saved dtype
        ap = part["AP"]
        every = np.ones((len(draws), ap[0].size), bool)
        ap_maps = np.stack([ap[rows].mean(0).ravel() for rows in draws]).astype(np.float64)  # averaged as saved
        for method in result["pcc"]["per_prompt"][kind]:
            x = part[method]
            per_prompt = _pccs(x.reshape(n, -1).astype(np.float64), ap.reshape(n, -1).astype(np.float64), every, draws)
            maps = np.stack([x[rows].mean(0).ravel() for rows in draws]).astype(np.float64)
            averaged = _pccs(maps, ap_maps, every, np.arange(len(draws))[:, None])
            for table, values in (("per_prompt", per_prompt), ("prompt_averaged", averaged)):
                entry = result["pcc"][table][kind][method]
                recomputed = [values[0], *np.nanpercentile(values[1:], [2.5, 97.5]).tolist()]
                if _differs(entry, recomputed):
                    problems.append((kind, method, table))
                checked += 1
    return checked, problems


@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_smollm2_intervals_recomputed_from_the_per_prompt_scores(task):
    result, scores, layers = _smollm2(task)
    assert smollm2_mismatches(result, scores, layers) == (len(KINDS) * 4 * 2, [])


def test_a_perturbed_score_fails_the_smollm2_check():
    result, scores, layers = _smollm2("ioi")
    k = int(np.argmax([np.abs(scores["RelP"][:, i * layers:(i + 1) * layers]).max() for i in range(len(KINDS))]))
    scores["RelP"] = _nudged(scores["RelP"])
    _, problems = smollm2_mismatches(result, scores, layers)
    assert (KINDS[k], "RelP", "per_prompt") in problems and {m for _, m, _ in problems} == {"RelP"}


def study_mismatches(task: str, result: dict, scores: dict, layers: int) -> tuple:
    """Each calibration-study run's held-out intervals of AtP, the preset and its choice, and of
    calibrated - AtP: ``(runs x kinds checked, [(size, draw, kind, method) that differ])``."""
    n = result["n"]
    draws = _library_draws(n, 1)
    cache, checked, problems = {}, 0, []
    for run in result["calibration"]["study"]["runs"]:
        chosen = _held_out_scores(task, result, run["choices"], scores, layers)
        for kind, cell in run["held_out"].items():
            k = KINDS.index(kind)
            ap = scores["AP"][:, k * layers:(k + 1) * layers].reshape(n, -1).astype(np.float64)
            methods = {"AtP": ("AtP", scores["AtP"][:, k * layers:(k + 1) * layers]),
                       "RelP (preset)": ("RelP", scores["RelP"][:, k * layers:(k + 1) * layers]),
                       "RelP+AH": ("RelP+AH", scores["RelP+AH"][:, k * layers:(k + 1) * layers]),
                       "RelP (calibrated)": (cell["choice"], chosen[kind])}
            values = {}
            for method, (name, x) in methods.items():
                if (kind, name) not in cache:
                    cache[kind, name] = _pccs(x.reshape(n, -1).astype(np.float64), ap, np.ones(ap.shape, bool), draws)
                values[method] = cache[kind, name]
                if _differs(cell["interval"][method], _percentiles(values[method][1:])):
                    problems.append((run["size"], run["draw"], kind, method))
            diff = values["RelP (calibrated)"] - values["AtP"]
            if _differs(cell["diff_interval"], _percentiles(diff[1:])):
                problems.append((run["size"], run["draw"], kind, "diff"))
            best = max(("AtP", "RelP (preset)", "RelP+AH"), key=lambda m: values[m][0])  # on the held-out pairs
            best_diff = values["RelP (calibrated)"] - values[best]
            if cell["best_preset"] != best or abs(cell["best_diff"] - best_diff[0]) > 1e-12 or _differs(
                    cell["best_diff_interval"], _percentiles(best_diff[1:])):
                problems.append((run["size"], run["draw"], kind, "best"))
            checked += 1
    return checked, problems


@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_smollm2_study_intervals_recomputed_from_the_per_prompt_scores(task):
    result, scores, layers = _smollm2(task)
    # the study keeps the entries where AP or a candidate is non-zero, and a candidate not scored on the
    # evaluated pairs is NaN there: with one such candidate, every entry (all-zero ones too) is kept
    parts = RESULTS / "smollm2" / "parts"
    prefix = f"{task}_eval_000_cand_"
    scored = set(SAME_AS) | {f.name[len(prefix):-len(".npz")] for f in parts.glob(f"{prefix}*.npz")}
    assert set(result["calibration"]["study"]["candidates"]) - scored
    assert {run["default"] for run in result["calibration"]["study"]["runs"]} == {"best-preset", "gradient"}
    checked, problems = study_mismatches(task, result, scores, layers)
    assert problems == [] and checked == len(result["calibration"]["study"]["runs"]) * len(KINDS) > 0


def test_a_perturbed_score_fails_the_study_check():
    result, scores, layers = _smollm2("ioi")
    scores["AtP"] = _nudged(scores["AtP"])
    _, problems = study_mismatches("ioi", result, scores, layers)
    assert problems and {method for *_, method in problems} <= {"AtP", "RelP (calibrated)", "diff", "best"}


def test_every_published_interval_is_recomputed_or_listed():
    assert_every_field_accounted_for("interval", RECOMPUTED, NOT_RECOMPUTED)
    assert all(NOT_RECOMPUTED.values())
