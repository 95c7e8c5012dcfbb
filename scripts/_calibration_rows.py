"""Row files of ``scripts/calibration_eval.py``: one JSON file per model, merged into one page.

Each measured model is one row: ``<rows-dir>/<slug of the model name>.json`` holds its results
and the command that measured it. The page is written from every row file of the directory
(and of ``--from-json`` sources): rows are combined by model name, a later source replacing an
earlier row of the same name, so runs of different models (different commands, different
helpers) merge without touching each other's rows. Row order on the page: IOI models first
(shipped, then SmolLM2-135M), then random-weight models in family-table order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from _calibration_tables import BEST_PRESET, main_run
from _calibration_tables import below as tables_below
from captum_relp.families import FAMILY_TABLE

ROWS_DIR = "docs/_static/results/calibration"
KINDS = ("resid", "attn", "mlp")
SCRIPT_CONFIG = "script config: 3 layers, hidden 32"
TINY_CONFIG = "tests/families tiny config: 2 layers, hidden 16"
IOI_ORDER = ("tiny-gpt2-ioi", "tiny-llama-ioi", "SmolLM2-135M")


def slug(model: str) -> str:
    """File name stem of a row: ``random gpt2 (seed 0)`` -> ``random-gpt2-seed-0``."""
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def row_family(row: Dict) -> Optional[str]:
    """The family-table ``model_type`` of a random-weight row (None for IOI rows)."""
    if "family" in row:
        return row["family"]
    match = re.match(r"random (\S+) \(", row["model"])
    return match.group(1) if match else None


def trimmed(row: Dict, table_size: int) -> Dict:
    """``row`` without the long per-run summaries, except that of the main table's run."""
    runs = [dict(run) if run["size"] == table_size and run["draw"] == 0
            else {k: v for k, v in run.items() if k != "summary"} for run in row["runs"]]
    return dict(row, runs=runs)


def write_rows(rows: Iterable[Dict], directory: str, command: str, table_size: int) -> None:
    """Write one row file per model (``command``: the one that measured rows lacking theirs)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row = dict(trimmed(row, table_size), command=row.get("command", command))
        (out / f"{slug(row['model'])}.json").write_text(json.dumps(row, separators=(",", ":")) + "\n")


def _read(path: Path) -> List[Dict]:
    if path.is_dir():
        return [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [data]


def load_rows(sources: Iterable[str]) -> List[Dict]:
    """Rows of every source (a row file, a list of rows or a directory of row files), merged by model name."""
    merged: Dict[str, Dict] = {}
    for source in sources:
        for row in _read(Path(source)):
            merged[row["model"]] = row
    return order(merged.values())


def order(rows: Iterable[Dict]) -> List[Dict]:
    """IOI rows (shipped, SmolLM2) first, then random rows in family-table order (script configs first)."""
    families = list(FAMILY_TABLE)

    def key(row):
        family = row_family(row)
        if family is None:
            name = row["model"]
            return (0, IOI_ORDER.index(name) if name in IOI_ORDER else len(IOI_ORDER), name)
        rank = families.index(family) if family in families else len(families)
        return (1, rank, row.get("config", SCRIPT_CONFIG) != SCRIPT_CONFIG, row["model"])

    return sorted(rows, key=key)


def commands(rows: List[Dict], fallback: str) -> List[str]:
    """One line per measuring command: the command and the rows it measured."""
    grouped: Dict[str, List[str]] = {}
    for row in rows:
        grouped.setdefault(row.get("command", fallback), []).append(row["model"])
    return [f"- `{cmd}`: {', '.join(models)}" for cmd, models in grouped.items()]


def coverage_table(rows: List[Dict], table_size: int) -> str:
    """One line per family of the family table: its rows, the component types measured and any refusal."""
    lines = ["| family | rows (config) | component types measured | refused | below AtP or best preset beyond noise |",
             "|---|---|---|---|---|"]
    for model_type, family in FAMILY_TABLE.items():
        mine = [r for r in rows if row_family(r) == model_type]
        refused = [f"{kind}: {why}" for kind, why in sorted(_refused(family).items())]
        if not mine:
            lines.append(f"| {model_type} | not measured | - | {'; '.join(refused) or '-'} | - |")
            continue
        names = "; ".join(f"{r['model']} ({r.get('config', SCRIPT_CONFIG)})" for r in mine)
        measured = sorted({k for r in mine for run in r["runs"] for k in run["held_out"]}, key=KINDS.index)
        below = [f"{r['model']} {kind}" for r in mine if (run := main_run(r, table_size, BEST_PRESET)) is not None
                 for kind, cell in run["held_out"].items()
                 if tables_below(cell) or tables_below(cell, "best_diff_interval")]
        lines.append(f"| {model_type} | {names} | {', '.join(measured)} | {'; '.join(refused) or '-'} | "
                     f"{'**' + ', '.join(below) + '**' if below else 'none'} |")
    return "\n".join(lines)


def _refused(family) -> Dict[str, str]:
    """``{component type or rule: reason}`` the family table refuses for ``family``."""
    refused = {"mlp": family.no_mlp} if family.mlp is None else {}
    if family.attn.how == "refused":
        refused["AH-rule"] = "the family computes attention in its own code"
    return refused
