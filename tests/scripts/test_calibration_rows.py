"""scripts/calibration_eval.py: the results page is generated from the committed row files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import _calibration_rows as rows_io  # noqa: E402
import calibration_eval  # noqa: E402

from captum_relp.families import FAMILY_TABLE  # noqa: E402

ROWS = ROOT / rows_io.ROWS_DIR
PAGE = ROOT / "docs" / "results_calibration.md"


def _row(model, diff_hi=0.01, **extra):
    cell = {"AtP": 0.5, "RelP (preset)": 0.4, "RelP (calibrated)": 0.5, "interval": {}, "diff": 0.0,
            "diff_interval": [-0.02, diff_hi], "choice": "gradient"}
    run = {"size": 20, "draw": 0, "choices": {"resid": "gradient"}, "decisions": {"resid": "default"},
           "held_out": {"resid": cell}}
    return dict({"model": model, "runs": [run], "seconds": 1.0, "candidates": ["gradient"], "n_pool": 20,
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
    assert rows_io.below_in_size_study(rows).startswith("Below AtP beyond the noise anywhere in the size study: "
                                                        "1 of 4")


def test_strengthening_a_post_norm_only_model_stays_finite():
    """Olmo2 normalises sublayer outputs only: scaling for norm inputs collapsed it to NaN."""
    ids, _ = calibration_eval.random_pairs(8, 8, seed=100)
    model = calibration_eval.tiny_family_model("olmo2", seed=0)
    stds = calibration_eval.strengthen(model, ids, norms=False)
    assert abs(stds["act_std"] - 2.0) < 0.05
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
