"""scripts/calibration_eval.py: the results page is generated from the committed row files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import _calibration_rows as rows_io  # noqa: E402
import _calibration_tables as tables  # noqa: E402
import calibration_eval  # noqa: E402

from captum_relp import RuleSet  # noqa: E402
from captum_relp.calibration import CandidateScores  # noqa: E402
from captum_relp.families import FAMILY_TABLE  # noqa: E402

ROWS = ROOT / rows_io.ROWS_DIR
PAGE = ROOT / "docs" / "results_calibration.md"


def _row(model, diff_hi=0.01, best_hi=0.01, **extra):
    """A row with one component type: the best-preset run (``diff_hi``, ``best_hi``: the upper ends of its
    intervals of calibrated - AtP and - best preset) and the gradient run (never below)."""
    def run(default, atp_hi, best):
        cell = {"AtP": 0.5, "RelP (preset)": 0.4, "RelP+AH": 0.45, "RelP (calibrated)": 0.5, "interval": {},
                "diff": 0.0, "diff_interval": [-0.02, atp_hi], "best_preset": "AtP", "best_diff": 0.0,
                "best_diff_interval": [-0.02, best], "choice": "gradient"}
        return {"size": 20, "draw": 0, "default": default, "choices": {"resid": "gradient"},
                "decisions": {"resid": "default"}, "held_out": {"resid": cell}}
    runs = [run(tables.BEST_PRESET, diff_hi, best_hi), run(tables.GRADIENT, 0.01, 0.01)]
    return dict({"model": model, "runs": runs, "seconds": 1.0, "candidates": ["gradient"], "n_pool": 20,
                 "n_eval": 60}, **extra)


def test_the_committed_page_is_what_the_script_writes_from_the_row_files(tmp_path):
    out = tmp_path / "page.md"
    subprocess.run([sys.executable, "scripts/calibration_eval.py", "--from-json", rows_io.ROWS_DIR,
                    "--markdown", str(out)], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"})
    written = out.read_text().replace(str(out), "docs/results_calibration.md")
    assert written == PAGE.read_text(), "regenerate docs/results_calibration.md with the command on the page"


def test_every_family_of_the_table_has_a_row_or_a_refusal():
    rows = rows_io.load_rows([str(ROWS)])
    table = rows_io.coverage_table(rows, 20)
    for model_type in FAMILY_TABLE:
        line = next(x for x in table.splitlines() if x.startswith(f"| {model_type} |"))
        assert "not measured" not in line, (
            f"{line}: add its row (scripts/calibration_eval.py --shipped --families --tiny-families {model_type} "
            f"--no-smollm --rows-dir {rows_io.ROWS_DIR}, then rewrite the page with the command on it)")
    measured = {row["model"]: row for row in rows}
    assert set(measured["random opt (tiny, seed 0)"]["runs"][0]["held_out"]) == {"resid", "attn"}
    assert "mlp: OPT runs fc1/fc2" in next(x for x in table.splitlines() if x.startswith("| opt |"))


def test_rows_combine_by_model_name_later_sources_win(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    rows_io.write_rows([_row("random llama (seed 0)"), _row("tiny-gpt2-ioi")], str(first), "cmd-a", 20)
    rows_io.write_rows([_row("random llama (seed 0)", diff_hi=-0.001, command="cmd-b"), _row("SmolLM2-135M"),
                        _row("random gpt2 (tiny, seed 0)", family="gpt2", config=rows_io.TINY_CONFIG)],
                       str(second), "unused", 20)
    rows = rows_io.load_rows([str(first), str(second)])
    assert [r["model"] for r in rows] == ["tiny-gpt2-ioi", "SmolLM2-135M", "random gpt2 (tiny, seed 0)",
                                          "random llama (seed 0)"]
    llama = rows[-1]
    assert llama["command"] == "cmd-b" and llama["runs"][0]["held_out"]["resid"]["diff_interval"][1] < 0
    assert rows[0]["command"] == "cmd-a"
    assert "**random llama (seed 0) resid**" in rows_io.coverage_table(rows, 20)
    assert tables.below_in_size_study(rows).startswith(
        "Default `best-preset` (the library's): below AtP beyond the noise anywhere in the size study: 1 of 4 ")
    assert " 0 of 4 " in tables.below_in_size_study(rows, tables.GRADIENT)
    assert " 0 of 4 " in tables.below_in_size_study(rows, tables.BEST_PRESET, "best_diff_interval")
    assert tables.size_study_counts(rows, tables.BEST_PRESET) == {"cases": 4, "below_atp": 1, "below_best": 0}


def test_strengthening_a_post_norm_only_model_stays_finite():
    """Olmo2 normalises sublayer outputs only: scaling for norm inputs collapsed it to NaN."""
    ids, _ = calibration_eval.random_pairs(8, 8, seed=100)
    model = calibration_eval.tiny_family_model("olmo2", seed=0)
    stds = calibration_eval.strengthen(model, ids, norms=False)
    assert abs(stds["act_std"] - 2.0) < 0.05
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def _pcc(x, y) -> float:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


NOISE = {"resid": {"gradient": 2.0, "relp": 0.3, "relp-ah": 0.6, "ln": 0.5},
         "mlp": {"gradient": 0.4, "relp": 1.0, "relp-ah": 0.05, "ln": 2.0}}
"""Synthetic candidates: AP plus noise of this size (per group): ``relp`` is the best preset of ``resid``,
``relp-ah`` that of ``mlp``, and the gradient never."""


def _synthetic_scores(n_pairs: int = 50) -> CandidateScores:
    gen = torch.Generator().manual_seed(3)
    reference, scores = [], {name: [] for name in NOISE["resid"]}
    for group in NOISE:
        ap = torch.randn(n_pairs, 6, generator=gen, dtype=torch.float64)
        reference.append(ap)
        for name, size in NOISE[group].items():
            scores[name].append(ap + size * torch.randn(n_pairs, 6, generator=gen, dtype=torch.float64))
    candidates = [RuleSet(name, categories=()) for name in NOISE["resid"]]
    return CandidateScores.from_layer_scores(candidates, reference, scores, list(NOISE))


def test_both_defaults_choose_from_the_same_scores(monkeypatch):
    """Each (size, subset) is chosen once per default from one set of scores; the held-out presets agree."""
    calls = []
    real = calibration_eval.choose_rules

    def recording(scores, **options):
        calls.append((options["default"], scores))
        return real(scores, **options)

    monkeypatch.setattr(calibration_eval, "choose_rules", recording)
    scores = _synthetic_scores()
    result = calibration_eval.study("synthetic", "test", scores, 20, [10, 20], draws=3, n_bootstrap=200, seconds=0.0)
    runs = result["runs"]
    assert [(r["size"], r["draw"], r["default"]) for r in runs] == [
        (size, draw, default) for size, draw in [(10, 0), (10, 1), (10, 2), (20, 0)] for default in
        ("best-preset", "gradient")]
    assert [d for d, _ in calls] == [r["default"] for r in runs] and result["defaults"] == ["best-preset", "gradient"]
    for (_, ours), (_, old) in zip(calls[::2], calls[1::2]):
        assert ours is old  # one subset of the scores, chosen twice
    subsets = [s.data["resid"].reference for _, s in calls[::2]]
    assert not torch.equal(subsets[1], subsets[2])  # the random subsets differ from each other
    for ours, old in zip(runs[::2], runs[1::2]):
        for kind, cell in ours["held_out"].items():
            other = old["held_out"][kind]
            for method in ("AtP", "RelP (preset)", "RelP+AH"):
                assert cell[method] == other[method] and cell["interval"][method] == other["interval"][method]
            if cell["choice"] == other["choice"]:
                assert cell == other


def test_best_preset_keeps_the_preset_that_agrees_best_on_the_calibration_pairs(monkeypatch):
    """Where its decision is ``default``, best-preset's choice is the preset with the highest calibration PCC."""
    calls = []
    real = calibration_eval.choose_rules
    monkeypatch.setattr(calibration_eval, "choose_rules",
                        lambda scores, **options: calls.append(scores) or real(scores, **options))
    result = calibration_eval.study("synthetic", "test", _synthetic_scores(), 20, [10, 20], draws=3,
                                    n_bootstrap=200, seconds=0.0)
    kept = []
    for run, scores in zip(result["runs"], calls):
        for group, decision in run["decisions"].items():
            if decision != "default":
                continue
            if run["default"] == "gradient":
                assert run["choices"][group] == "gradient"
                continue
            data = scores.data[group]
            pccs = {name: _pcc(data.scores[name], data.reference) for name in ("gradient", "relp", "relp-ah")}
            assert run["choices"][group] == max(pccs, key=pccs.get), (run["size"], run["draw"], group, pccs)
            kept.append(run["choices"][group])
    assert {"relp", "relp-ah"} <= set(kept)  # not the gradient: the check can tell the defaults apart


def test_held_out_cells_compare_with_the_best_preset_on_the_held_out_pairs():
    scores = _synthetic_scores()
    result = calibration_eval.study("synthetic", "test", scores, 20, [20], draws=1, n_bootstrap=200, seconds=0.0)
    held = scores.rows(torch.arange(20, 50))
    columns = {"AtP": "gradient", "RelP (preset)": "relp", "RelP+AH": "relp-ah"}
    for run in result["runs"]:
        for group, cell in run["held_out"].items():
            data = held.data[group]
            pccs = {m: _pcc(data.scores[name], data.reference) for m, name in columns.items()}
            calibrated = _pcc(data.scores[cell["choice"]], data.reference)
            for method, value in {**pccs, "RelP (calibrated)": calibrated}.items():
                assert abs(cell[method] - value) < 1e-12, (group, method)
            best = max(pccs, key=pccs.get)
            assert cell["best_preset"] == best
            assert abs(cell["best_diff"] - (calibrated - pccs[best])) < 1e-12
            assert abs(cell["diff"] - (calibrated - pccs["AtP"])) < 1e-12
            low, high = cell["best_diff_interval"]
            assert low <= cell["best_diff"] <= high
    gradient = next(r for r in result["runs"] if r["default"] == "gradient")
    # resid: relp beats the gradient beyond the noise; mlp: relp-ah, the best preset on the held-out pairs too
    assert gradient["held_out"]["mlp"]["best_preset"] == "RelP+AH"


@pytest.mark.parametrize("default", [tables.BEST_PRESET, tables.GRADIENT])
def test_the_page_counts_follow_the_rows(default):
    rows = [_row("random llama (seed 0)", diff_hi=-0.001), _row("random gpt2 (seed 0)", best_hi=-0.001),
            _row("tiny-gpt2-ioi")]
    counts = tables.counts(rows, 20, default)
    if default == tables.BEST_PRESET:
        assert counts["below_atp"] == ["random llama (seed 0) resid"]
        assert counts["below_best"] == ["random gpt2 (seed 0) resid"]
    else:
        assert counts["below_atp"] == counts["below_best"] == []
    assert len(counts["rows"]) == len(counts["best_measured"]) == 3
    assert tables.verdict(rows, 20, default).count(" of 3 rows") == 2
