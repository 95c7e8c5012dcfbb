"""The results pages say what their JSON says: every number is re-derived from the committed result files.

Pages the scripts can redraw without a model (calibration, Gemma-3, edges) are rendered again and
compared with the committed text; the pages written while measuring (the embedded models' tables,
SmolLM2-135M) have their PCC tables parsed and each cell checked against the JSON. Each check is
also run on a copy with one number changed, to show that it catches a drift.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

DOCS = ROOT / "docs"
RESULTS = DOCS / "_static" / "results"
TITLES = {"Residual stream": "resid", "Attention outputs": "attn", "MLP outputs": "mlp"}
TASKS = {"## IOI": "ioi", "## Subject-verb": "sva"}
VIEWS = ("per_prompt", "prompt_averaged")
_CELL = re.compile(r"^\*{0,2}(-?\d+\.\d+)(?: \[(-?\d+\.\d+), (-?\d+\.\d+)\])?\*{0,2}$")


def _tables(lines: List[str]) -> List[List[List[str]]]:
    """The Markdown tables in ``lines``: rows of stripped cells, header first, separator dropped."""
    tables, current = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _sections(text: str, starts: Dict[str, str]) -> Dict[str, List[str]]:
    """The lines under each ``## heading`` whose start is a key of ``starts``, keyed by its value."""
    out, key = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            key = next((v for k, v in starts.items() if line.startswith(k)), None)
            if key is not None:
                out[key] = []
        elif key is not None:
            out[key].append(line)
    return out


def pcc_mismatches(text: str, pcc_by_section: Dict[str, Dict[str, Dict]], starts: Dict[str, str],
                   intervals: bool) -> List[str]:
    """Cells of the PCC tables of a page that differ from the JSON (3 decimals, as the pages print).

    ``pcc_by_section[section][view][kind][method]`` is a number, or ``[value, low, high]`` when
    ``intervals``; per section, the first table with a ``component`` header is the per-prompt one, the
    second the prompt-averaged one. Returns one line per differing or unparsable cell, and per
    section whose tables are missing.
    """
    problems = []
    sections = _sections(text, starts)
    for section, by_view in pcc_by_section.items():
        tables = [t for t in _tables(sections.get(section, [])) if t[0][0] == "component"][:2]
        if len(tables) < 2:
            problems.append(f"{section}: {len(tables)} PCC tables, 2 expected")
            continue
        for view, table in zip(VIEWS, tables):
            methods = table[0][1:]
            for row in table[1:]:
                kind = TITLES[row[0]]
                for method, cell in zip(methods, row[1:]):
                    entry = by_view[view][kind][method]
                    expected = [entry] if not intervals else list(entry)
                    match = _CELL.match(cell)
                    got = [g for g in match.groups() if g is not None] if match else None
                    if got != [f"{v:.3f}" for v in expected]:
                        problems.append(f"{section} {view} {kind} {method}: page {cell!r}, JSON {expected}")
    return problems


def _measured_pccs() -> Dict[str, Dict]:
    out = {}
    for folder in sorted(RESULTS.glob("ioi-*")):
        record = json.loads((folder / "ioi_results.json").read_text())
        out[record["config"]["model"]] = {"per_prompt": record["pcc_per_prompt"],
                                          "prompt_averaged": record["pcc_mean_map"]}
    return out


def _measured_mismatches(text: str) -> List[str]:
    pccs = _measured_pccs()
    # each model's section is a ### heading of the IOI part of the page
    shifted = "\n".join("## " + line[4:] if line.startswith("### ") else line for line in text.splitlines())
    return pcc_mismatches(shifted, pccs, {f"## {name}": name for name in pccs}, intervals=False)


def _real_model_mismatches(text: str, record: Dict) -> List[str]:
    return pcc_mismatches(text, {task: record[task]["pcc"] for task in TASKS.values() if record.get(task)},
                          TASKS, intervals=True)


def _changed(text: str, number: str) -> str:
    """``text`` with the first table cell holding ``number`` given another last digit."""
    index = text.index(f"| {number}")
    changed = number[:-1] + str((int(number[-1]) + 1) % 10)
    return text[:index] + f"| {changed}" + text[index + 2 + len(number):]


def test_embedded_models_tables_match_their_json():
    text = (DOCS / "results_measured.md").read_text()
    assert len(_measured_pccs()) == 2
    assert _measured_mismatches(text) == []
    value = f"{_measured_pccs()['tiny-llama-ioi']['prompt_averaged']['mlp']['AtP']:.3f}"
    broken = text.replace(f"| MLP outputs | {value}", f"| MLP outputs | {float(value) + 0.001:.3f}")
    assert broken != text
    assert len(_measured_mismatches(broken)) == 1


@pytest.mark.parametrize("page, folder", [("results_smollm2.md", "smollm2"), ("results_gemma3.md", "gemma3")])
def test_real_model_tables_match_their_json(page, folder):
    text = (DOCS / page).read_text()
    record = json.loads((RESULTS / folder / "results.json").read_text())
    assert _real_model_mismatches(text, record) == []
    low = f"{record['sva']['pcc']['per_prompt']['attn']['RelP'][1]:.3f}"
    assert low in text
    assert len(_real_model_mismatches(text.replace(f"[{low},", f"[{float(low) - 0.001:.3f},", 1), record)) == 1


def test_gemma3_page_is_what_the_script_renders(tmp_path, monkeypatch):
    import gemma3_results

    monkeypatch.setattr(gemma3_results, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    gemma3_results.render(json.loads((RESULTS / "gemma3" / "results.json").read_text()))
    assert (tmp_path / "docs" / "results_gemma3.md").read_text() == (DOCS / "results_gemma3.md").read_text()


def _render_calibration(rows: Path, out: Path, monkeypatch) -> str:
    import calibration_eval

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["calibration_eval.py", "--from-json", str(rows), "--markdown", str(out)])
    calibration_eval.main()
    return out.read_text().replace(str(rows), "docs/_static/results/calibration").replace(
        str(out), "docs/results_calibration.md")


def test_calibration_page_is_what_the_script_renders(tmp_path, monkeypatch):
    rows = tmp_path / "calibration"
    shutil.copytree(RESULTS / "calibration", rows)
    committed = (DOCS / "results_calibration.md").read_text()
    assert _render_calibration(rows, tmp_path / "page.md", monkeypatch) == committed
    # one held-out number changed in a row file: the page no longer matches
    path = rows / "tiny-gpt2-ioi.json"
    record = json.loads(path.read_text())
    run = next(r for r in record["runs"] if r["size"] == 20 and r["draw"] == 0)
    run["held_out"]["mlp"]["AtP"] += 0.002
    path.write_text(json.dumps(record))
    assert _render_calibration(rows, tmp_path / "page.md", monkeypatch) != committed


def test_edges_page_sections_are_what_the_script_renders():
    import make_edge_results

    page = (DOCS / "results_edges.md").read_text()
    files = sorted(RESULTS.glob("edges-*/edges_results.json"))
    assert len(files) == 7
    for path in files:
        cell = json.loads(path.read_text())
        assert make_edge_results.section(cell) in page, path.parent.name
        for row in make_edge_results.summary([cell])[2:-1]:
            assert row in page, path.parent.name
    cell = json.loads(files[0].read_text())
    convention = next(iter(cell["conventions"].values()))
    convention["methods"]["relp"]["cpr"] += 0.01
    assert make_edge_results.section(cell) not in page


def test_a_changed_cell_is_named_by_the_check():
    """The parser reads bold cells and intervals, and names the cell that differs."""
    record = {"ioi": {"pcc": {view: {k: {"AtP": [0.5, 0.4, 0.6], "RelP": [0.7, 0.65, 0.75]} for k in TITLES.values()}
                              for view in VIEWS}}}
    rows = "\n".join(f"| {title} | 0.500 [0.400, 0.600] | **0.700 [0.650, 0.750]** |" for title in TITLES)
    table = "| component | AtP | RelP |\n|---|---:|---:|\n" + rows + "\n"
    text = "## IOI (Table 5 layout)\n\n" + table + "\ntext\n\n" + table
    assert _real_model_mismatches(text, record) == []
    assert _real_model_mismatches(_changed(text, "0.500"), record) == [
        "ioi per_prompt resid AtP: page '0.501 [0.400, 0.600]', JSON [0.5, 0.4, 0.6]"]
    assert _real_model_mismatches(text.split("text")[0], record) == ["ioi: 1 PCC tables, 2 expected"]


def _summary_pages():
    import results_pages

    return results_pages


def test_summary_pages_are_what_the_script_renders():
    """docs/results.md and the one-page-per-question pages, re-rendered from the JSON (no model runs)."""
    pages = _summary_pages()
    import captum_relp

    committed = {name: (DOCS / name).read_text() for name in pages.PAGES}
    date = pages.page_date(committed["results.md"])
    assert date is not None and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date)
    rendered = pages.render_pages(ROOT, captum_relp.__version__, date)
    for name, text in rendered.items():
        assert text == committed[name], f"regenerate docs/{name}: python scripts/results_pages.py --date {date}"


def test_summary_tables_put_the_methods_in_one_order_and_follow_the_json(tmp_path):
    pages = _summary_pages()
    rendered = pages.render_pages(ROOT, "0.0", "2025-01-01")
    order = ["AtP", "RelP", "RelP+AH", "calibrated"]
    for name, text in rendered.items():
        if name == "results.md":
            continue
        header = next(line for line in text.splitlines() if line.startswith("| "))  # the first table
        cells = [c.strip() for c in header.strip("|").split("|")]
        if name == "results_edges_mib.md":
            assert cells[4:7] == ["EAP (AtP)", "RelP", "RelP+AH (q/k local)"], name
        else:
            assert [c for c in cells if c in order] == order, name
            assert "N" in cells or "N runs" in cells or any("(N " in c for c in cells), name
    # a changed number in a copy of the JSON changes the page
    copy = tmp_path / "root"
    shutil.copytree(RESULTS / "gemma3", copy / "docs" / "_static" / "results" / "gemma3")
    path = copy / "docs" / "_static" / "results" / "gemma3" / "results.json"
    record = json.loads(path.read_text())
    shutil.copytree(RESULTS / "smollm2", copy / "docs" / "_static" / "results" / "smollm2",
                    ignore=shutil.ignore_patterns("parts", "*.png"))
    before = "\n".join(pages.real_models_page(copy))
    record["ioi"]["pcc"]["per_prompt"]["mlp"]["RelP+AH"][0] += 0.01
    path.write_text(json.dumps(record))
    after = "\n".join(pages.real_models_page(copy))
    assert before != after and f"{record['ioi']['pcc']['per_prompt']['mlp']['RelP+AH'][0]:.3f}" in after


def test_calibration_summary_shows_the_best_preset_runs_and_counts_both_defaults(tmp_path):
    """The calibrated column is the best-preset run's; the opening counts follow the row files."""
    pages = _summary_pages()
    import _calibration_tables as tables

    copy = tmp_path / "root" / "docs" / "_static" / "results"
    shutil.copytree(RESULTS / "calibration", copy / "calibration")
    (copy / "smollm2").mkdir()
    shutil.copy(RESULTS / "smollm2" / "results.json", copy / "smollm2" / "results.json")
    root = tmp_path / "root"
    before = pages.calibration_page(root)
    path = copy / "calibration" / "tiny-llama-ioi.json"
    record = json.loads(path.read_text())
    ours = tables.main_run(record, 20, tables.BEST_PRESET)
    old = tables.main_run(record, 20, tables.GRADIENT)
    assert ours is not None and old is not None and ours is not old
    table = [line for line in before if line.startswith("| tiny-llama-ioi, IOI (N = 60) |")]
    assert len(table) == 3
    for line, (kind, cell) in zip(table, ours["held_out"].items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5] == f"{cell['RelP (calibrated)']:.3f} [{cell['interval']['RelP (calibrated)'][0]:.3f}, " \
                           f"{cell['interval']['RelP (calibrated)'][1]:.3f}]", kind
        assert cells[4] == f"{cell['RelP+AH']:.3f} [{cell['interval']['RelP+AH'][0]:.3f}, " \
                           f"{cell['interval']['RelP+AH'][1]:.3f}]", kind
        assert cells[6] == cell["choice"]
    smol = [line for line in before if line.startswith("| SmolLM2-135M, ")]
    smol_record = json.loads((copy / "smollm2" / "results.json").read_text())
    smol_cells = [cell for task in ("ioi", "sva") for cell in tables.main_run(
        smol_record[task]["calibration"]["study"], 20, tables.BEST_PRESET)["held_out"].values()]
    assert len(smol) == len(smol_cells) == 6 and not any("default)" in line for line in smol)
    assert [line.strip("|").split("|")[6].strip() for line in smol] == [cell["choice"] for cell in smol_cells]
    counts = pages.calibration_counts(root)
    n_rows = len(counts[tables.BEST_PRESET]["rows"])
    assert n_rows == len(counts[tables.GRADIENT]["rows"]) > 6
    for default in (tables.BEST_PRESET, tables.GRADIENT):  # SmolLM2-135M's own study is counted, both defaults
        assert sum(r.startswith("SmolLM2-135M ") for r in counts[default]["rows"]) == 6
    # one best-preset cell moved below the best preset beyond the noise: the best-preset count, only, goes up
    ours["held_out"]["mlp"]["best_diff_interval"] = [-0.3, -0.2]
    path.write_text(json.dumps(record))
    after = pages.calibration_counts(root)
    assert after[tables.BEST_PRESET]["below_best"] == sorted(
        counts[tables.BEST_PRESET]["below_best"] + ["tiny-llama-ioi mlp"], key=after[tables.BEST_PRESET]["rows"].index)
    assert after[tables.GRADIENT] == counts[tables.GRADIENT]
    n_below = len(after[tables.BEST_PRESET]["below_best"])
    assert f"below the best preset beyond the noise in {n_below} of {n_rows} rows" in "\n".join(pages.calibration_page(root))
