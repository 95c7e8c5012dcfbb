"""scripts/make_results.py: the models table is read from the committed result files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import make_results  # noqa: E402

RESULTS = ROOT / "docs" / "_static" / "results"


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_committed_table_is_what_the_script_writes():
    written = "\n".join(make_results.models_table(ROOT))
    assert written == (ROOT / "docs" / "results_models.md").read_text(), \
        "regenerate with `python scripts/make_results.py --models-table`"


def test_rows_carry_the_saved_per_prompt_correlations():
    rows = {_cells(line)[0]: _cells(line) for line in make_results.models_table(ROOT) if line.startswith("| `")}
    saved = json.loads((RESULTS / "ioi-tiny-gpt2-ioi" / "ioi_results.json").read_text())["pcc_per_prompt"]
    assert rows["`tiny-gpt2-ioi`"][5] == " / ".join(f"{saved['resid'][m]:.3f}" for m in ("RelP", "RelP+AH", "AtP"))
    real = json.loads((RESULTS / "smollm2" / "results.json").read_text())
    mlp = real["ioi"]["pcc"]["per_prompt"]["mlp"]
    row = rows["`smollm2-135m`"]
    assert row[4] == str(real["ioi"]["n"]) == "100"
    assert row[7] == f"{mlp['RelP'][0]:.3f} / {mlp['RelP+AH'][0]:.3f} / {mlp['AtP'][0]:.3f}"
    assert row[2:4] == ["30", f"{real['model_card']['parameters'] / 1e6:.2f} M"]
