"""The page of calibrated rules on real models: written from the run folders it ships, every
correlation recomputed from the saved per-prompt scores and equal to what the runs saved."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import calibration_real_page as page  # noqa: E402

PAGE = ROOT / "docs" / "results_calibration_real.md"
RUNS = sorted(p.name for p in page.ROOT.iterdir() if p.is_dir()) if page.ROOT.is_dir() else []


def test_every_shipped_run_is_on_the_page_and_the_page_is_what_the_script_writes():
    assert RUNS and set(RUNS) <= set(page.RUNS)
    assert PAGE.read_text() == page.render()


@pytest.mark.parametrize("name", RUNS)
def test_recomputed_correlations_equal_the_saved_ones(name):
    run = page.load_run(page.ROOT / name)
    results, scores = run["results"], run["scores"]
    valid = scores["valid"].astype(bool)
    for kind in page.KINDS:
        reference = scores[f"AP/{kind}"]
        keep = np.broadcast_to(valid[: reference.shape[0], None, :], reference.shape)
        for method in page.METHODS:
            mine = np.corrcoef(scores[f"{method}/{kind}"][: reference.shape[0]][keep], reference[keep])[0, 1]
            saved = results["agreement_with_ap"][kind][method]
            assert abs(mine - saved["pcc"]) < 1e-9 and saved["interval"][0] <= saved["pcc"] <= saved["interval"][1]
            if run["kind"] == "ioi":
                assert abs(mine - results["pcc_per_prompt"][kind][method]) < 1e-12
        table = page.agreement(run)[kind]
        assert table["best"]["method"] == max(page.PRESETS, key=lambda m: table[m]["pcc"])


def test_a_changed_score_changes_the_page(tmp_path):
    shutil.copytree(page.ROOT, tmp_path / "runs")
    assert page.render(tmp_path / "runs") == page.render()
    name = RUNS[0]
    kind = page.load_run(tmp_path / "runs" / name)["kind"]
    path = tmp_path / "runs" / name / f"{kind}_scores.npz"
    arrays = dict(np.load(path))
    arrays["RelP/mlp"] = arrays["RelP/mlp"] * -1.0
    np.savez_compressed(path, **arrays)
    assert page.render(tmp_path / "runs") != page.render()
    assert json.loads((tmp_path / "runs" / name / "captum-relp-run.json").read_text())["command"] in ("ioi", "attribute")


def test_the_own_task_guide_quotes_the_greater_than_run():
    """The guide's calibrated numbers on greater-than are the page's (value, interval and rules)."""
    import re

    guide = (ROOT / "docs" / "own_task.md").read_text()
    paragraph = guide[guide.index("calibrated RelP gives"):guide.index("**Linearity.**")]
    section = PAGE.read_text().split("### SmolLM2-135M, greater-than")[1].split("###")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    quoted = re.findall(r"(\d\.\d{3} \[\d\.\d\d, \d\.\d\d\])\s+on\s+(?:the\s+)?(residual\s+stream|attention\s+"
                        r"outputs|MLP\s+outputs)\s+\((?:rules\s+)?`([^`]+)`", paragraph)
    assert len(quoted) == 3
    for cell, kind, rules in quoted:
        words = " ".join(kind.split())
        row = rows[words[0].upper() + words[1:]]
        assert row.split(" | ")[4] == cell and f"`{rules}`" in row, (kind, cell, rules)
