"""Write the results pages: one short page per question, each opening with its summary table.

Reads only committed JSON (``docs/_static/results/``, ``benchmarks/results/``); runs no model:

    python scripts/results_pages.py            # rewrites docs/results.md and docs/results_*.md below

Pages: ``results.md`` (the index: one row per question), ``results_paper.md`` (the paper's Table 5
layout on the embedded models, and the paper's own numbers), ``results_real_models.md``
(SmolLM2-135M, Gemma-3 270M), ``results_edges_mib.md`` (edge circuits, both conventions),
``results_calibration_summary.md`` (calibrated rules, held out) and ``results_performance.md``.
Each summary table has its method columns in the order AtP, RelP, RelP+AH, calibrated, with N
and the 95% bootstrap interval where the JSON has them; the detail stays on the linked pages the
measuring scripts write (``results_measured.md``, ``results_smollm2.md``, ``results_gemma3.md``,
``results_edges.md``, ``results_calibration*.md``; ``results_performance_detail.md`` by hand).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import _calibration_tables as tables

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs") / "_static" / "results"
KINDS = {"resid": "Residual stream", "attn": "Attention outputs", "mlp": "MLP outputs"}
COLUMNS = ("AtP", "RelP", "RelP+AH", "calibrated")
"""Method columns of every summary table, in this order."""
CALIBRATED = "RelP (calibrated)"
NOT_RUN = "not run"

PAPER_TABLE5 = {  # Jafari et al. (2025), Appendix B, Table 5: (AtP, RelP) per component type
    "GPT-2 small": ((0.753, 0.968), (0.979, 0.962), (0.195, 0.992)),
    "GPT-2 medium": ((0.671, 0.884), (0.961, 0.982), (0.551, 0.993)),
    "GPT-2 large": ((0.740, 0.853), (0.461, 0.965), (0.006, 0.956)),
    "Pythia-70M": ((0.728, 0.898), (0.981, 0.986), (0.507, 0.967)),
    "Pythia-410M": ((0.695, 0.874), (0.879, 0.903), (0.501, 0.948)),
    "Qwen2-0.5B": ((0.684, 0.922), (0.933, 0.965), (0.717, 0.981)),
    "Qwen2-7B": ((0.230, 0.549), (0.395, 0.569), (0.471, 0.622)),
    "Gemma2-2B": ((0.391, 0.769), (0.942, 0.956), (0.910, 0.952)),
}


def _load(root: Path, relative: str) -> Dict:
    return json.loads((root / relative).read_text())


def _table(header: Sequence[str], rows: List[Sequence], text_columns: int = 1) -> List[str]:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the numbers right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _value(entry) -> str:
    """``0.842`` or, for ``[value, low, high]``, ``0.842 [0.801, 0.880]``."""
    if entry is None:
        return NOT_RUN
    if isinstance(entry, (list, tuple)):
        return f"{entry[0]:.3f} [{entry[1]:.3f}, {entry[2]:.3f}]"
    return f"{entry:.3f}"


def _footer(command: str, sources: str, version: str, date: str) -> List[str]:
    return ["```{admonition} How this page was made", f"Written by `{command}` (captum-relp {version}, {date}) "
            f"from {sources}, without running a model.", "```", ""]


def _methods(by_method: Dict) -> List[str]:
    """The four columns' cells of one row: AtP, RelP, RelP+AH, calibrated."""
    names = {"AtP": "AtP", "RelP": "RelP", "RelP+AH": "RelP+AH", "calibrated": CALIBRATED}
    return [_value(by_method.get(names[c])) for c in COLUMNS]


def paper_page(root: Path) -> List[str]:
    """The Table 5 layout on the embedded models (summary), then the paper's own numbers."""
    rows = []
    for path in sorted((root / RESULTS).glob("ioi-*/ioi_results.json")):
        record = json.loads(path.read_text())
        for kind, title in KINDS.items():
            intervals = record.get("agreement_with_ap", {}).get(kind, {})
            cells = {m: [pcc, *intervals[m]["interval"]] if intervals.get(m, {}).get("interval") else pcc
                     for m, pcc in record["pcc_per_prompt"][kind].items()}
            rows.append([f"`{record['config']['model']}`", record["config"]["n_prompts"], title] + _methods(cells))
    lines = ["# The paper's Table 5, reproduced on the embedded models", "",
             "Does RelP agree with activation patching better than AtP, as the paper's Table 5 reports? "
             "PCC with activation patching, per-prompt maps, IOI prompt pairs with held-out names (N pairs per "
             "model; in brackets the 95% bootstrap interval over the prompts). The calibrated column was not "
             "part of these runs: {doc}`results_calibration_summary` compares it.", ""]
    lines += _table(["model", "N", "component", *COLUMNS], rows, 3)
    lines += ["Detail (prompt-averaged maps, wall times, heatmaps, SVA circuit discovery): "
              "{doc}`results_embedded`. The same layout on real pretrained models: {doc}`results_real_models`.", "",
              "## Reported in the paper", "",
              '<span class="paper-label">Reported in the paper, not measured by this library.</span>',
              "PCC between activation patching and AtP or RelP over 100 IOI prompts, per component type; higher "
              "is closer to activation patching. Jafari et al. (2025), Appendix B, Table 5 (RelP+AH and calibrated "
              "rules are this library's and not in the paper).", ""]
    header = ["Model"] + [f"{title} {m}" for title in KINDS.values() for m in ("AtP", "RelP")]
    paper_rows = [[model] + [f"**{v:.3f}**" if v == max(pair) else f"{v:.3f}" for pair in cells for v in pair]
                  for model, cells in PAPER_TABLE5.items()]
    lines += _table(header, paper_rows)
    lines += ["Citation: Farnoush Rezaei Jafari, Oliver Eberle, Ashkan Khakzar, Neel Nanda. *RelP: Faithful and "
              "Efficient Circuit Discovery in Language Models via Relevance Patching.* 2025. Table 5.", ""]
    return lines


REAL_MODELS = (("SmolLM2-135M", "smollm2", "results_smollm2"), ("Gemma-3 270M", "gemma3", "results_gemma3"))
TASK_TITLES = {"ioi": "IOI", "sva": "SVA"}


def real_models_page(root: Path) -> List[str]:
    """SmolLM2-135M and Gemma-3 270M: per-prompt PCC with AP, every method, N and intervals."""
    rows, commands = [], []
    for name, folder, page in REAL_MODELS:
        record = _load(root, f"{RESULTS}/{folder}/results.json")
        commands.append(f"{name}: `{record['command']}` ({{doc}}`{page}`)")
        for task, title in TASK_TITLES.items():
            result = record.get(task)
            if not result:
                continue
            for kind, kind_title in KINDS.items():
                rows.append([name, title, result["n"], kind_title] + _methods(result["pcc"]["per_prompt"][kind]))
    lines = ["# Real pretrained models: SmolLM2-135M and Gemma-3 270M", "",
             "Does the Table 5 pattern hold on real pretrained models? PCC with activation patching, "
             "per-prompt maps (every prompt x layer x position value), at the task's positions; N prompt pairs; "
             "95% bootstrap interval over prompts in brackets. Calibrated rules on these pairs were measured on "
             "SmolLM2 only; on both models, on 16 pairs: {doc}`results_calibration_real`.", ""]
    lines += _table(["model", "task", "N", "component", *COLUMNS], rows, 4)
    lines += ["Measured by:", ""] + [f"- {c}" for c in commands] + [""]
    lines += ["Each model's page has the model card, prompt-averaged maps, wall times, heatmaps and circuit "
              "faithfulness: {doc}`results_smollm2`, {doc}`results_gemma3`.", "", "```{include} results_models.md", "```",
              "", "```{toctree}", ":hidden:", "", "results_smollm2", "results_gemma3", "```", ""]
    return lines


EDGE_COLUMNS = (("EAP (AtP)", "eap"), ("RelP", "relp"), ("RelP+AH (q/k local)", "relp-ah-qk"),
                ("EAP-IG", "eap-ig"), ("exact", "exact"))
"""Edge methods in the column order of the other pages (EAP is AtP on edges); no calibrated edges."""


def edges_page(root: Path) -> List[str]:
    """CPR of each edge method, per model, task and convention, with N and intervals."""
    rows = []
    for path in sorted((root / RESULTS).glob("edges-*/edges_results.json")):
        cell = json.loads(path.read_text())
        for convention, entry in cell["conventions"].items():
            cells = []
            for _title, method in EDGE_COLUMNS:
                m, interval = entry["methods"].get(method), entry["intervals"].get(method)
                cells.append(NOT_RUN if m is None else _value([m["cpr"], *interval["cpr"]]) if interval
                             else _value(m["cpr"]))
            rows.append([f"`{Path(cell['model']).name}`", cell["task"].upper(), convention, cell["n_eval"]] + cells)
    settings = _load(root, f"{RESULTS}/edges_settings.json")
    lines = ["# Edge circuits and MIB's convention", "",
             "Do RelP's edge scores find circuits as faithful as EAP's and EAP-IG's? CPR (area under the "
             "faithfulness curve of the top-|score| edge circuits, higher is better) on N held-out evaluation "
             "prompts, under the library's convention and MIB's; 95% percentile bootstrap interval over the "
             "evaluation prompts in brackets (circuits fixed). `exact` is edge patching itself.", ""]
    lines += _table(["model", "task", "convention", "N", *[t for t, _ in EDGE_COLUMNS]], rows, 4)
    lines += ["CMD, differences to EAP with their intervals, PCC with exact edge patching, cost and the "
              "faithfulness figures: {doc}`results_edges_detail`. Settings of the measurement: "
              + ", ".join(f"`{k}` {v}" for k, v in settings.items()) + ".", "",
              "```{toctree}", ":hidden:", "", "results_edges_detail", "```", ""]
    return lines


def _calibration_studies(root: Path) -> List[Dict]:
    """Every held-out calibration study: the row files, then SmolLM2-135M's (IOI, SVA) from its results."""
    studies = [json.loads(path.read_text()) for path in sorted((root / RESULTS / "calibration").glob("*.json"))]
    smol = _load(root, f"{RESULTS}/smollm2/results.json")
    return studies + [smol[task]["calibration"]["study"] for task in TASK_TITLES
                      if smol.get(task) and smol[task].get("calibration")]


def calibration_counts(root: Path, size: int = 20) -> Dict[str, Dict[str, List[str]]]:
    """Per default (``best-preset``, ``gradient``): the rows of the held-out study (the row files and
    SmolLM2-135M's own study) and those below AtP, and below the best preset, beyond the noise."""
    rows = _calibration_studies(root)
    return {default: tables.counts(rows, size, default) for default in (tables.BEST_PRESET, tables.GRADIENT)}


def _calibration_sentence(counts: Dict[str, List[str]]) -> str:
    return (f"below AtP beyond the noise in {len(counts['below_atp'])} of {len(counts['rows'])} rows and below "
            f"the best preset beyond the noise in {len(counts['below_best'])} of {len(counts['best_measured'])} rows")


def calibration_page(root: Path, size: int = 20) -> List[str]:
    """Held-out PCC with AP after calibrating on ``size`` pairs: trained models in the table, all rows counted."""
    rows = []
    for study in _calibration_studies(root):
        if study["model"].startswith("random"):
            continue  # random-weight families: on the detail page
        run = tables.main_run(study, size, tables.BEST_PRESET)
        if run is None:
            continue
        for kind, row in run["held_out"].items():
            cells = {m: [row[m], *row["interval"][m]] if row["interval"].get(m) else row.get(m)
                     for m in ("AtP", "RelP (preset)", "RelP+AH", CALIBRATED)}
            rows.append([f"{study['model']}, {study['task'].upper()} (N = {study['n_eval']})", KINDS[kind]]
                        + [_value(cells[m]) for m in ("AtP", "RelP (preset)", "RelP+AH", CALIBRATED)]
                        + [row["choice"], tables.cell_text(row["diff"], row["diff_interval"]), tables.best_text(row)])
    counts = calibration_counts(root, size)
    studied = _calibration_studies(root)
    size_study = {d: tables.size_study_counts(studied, d) for d in (tables.BEST_PRESET, tables.GRADIENT)}
    lines = ["# Calibrated rules, held out", "",
             f"Do rules calibrated on {size} pairs agree with activation patching on pairs they never saw? PCC "
             "with AP on N held-out pairs of the trained models, with the library's default (`\"best-preset\"`), "
             "95% bootstrap intervals in brackets.", ""]
    lines += _table(["model, task (N held-out pairs)", "component", "AtP", "RelP", "RelP+AH", "calibrated",
                     "rules chosen", "calibrated - AtP", "calibrated - best preset"], rows, 2)
    lines += ["With the default (per component type the fixed preset, AtP's gradient, RelP or RelP+AH, that "
              "agrees best with activation patching on the calibration pairs is kept unless another candidate "
              f"beats it beyond the noise), rules chosen on {size} calibration pairs put calibrated RelP "
              f"{_calibration_sentence(counts[tables.BEST_PRESET])} of the held-out study (the random-weight "
              "families and SmolLM2-135M included). With the gradient as default, the same runs (chosen from the same "
              f"scores) put it {_calibration_sentence(counts[tables.GRADIENT])}. Over the calibration-size study "
              f"(10 to 100 pairs, several subsets each: {size_study[tables.BEST_PRESET]['cases']} cases per default) "
              f"the default is below AtP beyond the noise in {size_study[tables.BEST_PRESET]['below_atp']} cases "
              f"and below the best preset in {size_study[tables.BEST_PRESET]['below_best']}, the gradient in "
              f"{size_study[tables.GRADIENT]['below_atp']} and {size_study[tables.GRADIENT]['below_best']} "
              "({doc}`results_calibration_detail`).", "",
              "RelP is the `\"relp\"` preset, RelP+AH the `\"relp-ah\"` preset; the best preset is the one of AtP, "
              "RelP and RelP+AH with the highest PCC on the held-out pairs (named in brackets), and \"below beyond "
              "the noise\" means the paired interval of the difference lies entirely below zero. The SmolLM2-135M "
              "rows come from their own study (`scripts/make_results.py --real-model`), chosen with both defaults "
              "from the same scores like the other rows, but with AP read at the task's positions only and the "
              "evaluated pairs of {doc}`results_smollm2` held out; they are counted above.", ""]
    lines += ["Calibrated RelP against both presets (RelP and RelP+AH) and AtP, on SmolLM2-135M and Gemma-3 270M "
              "(IOI) and on a greater-than task: {doc}`results_calibration_real`. Commands, the random-weight rows "
              "of every family, the same runs with the gradient as default, the family coverage and the "
              "calibration-size study: {doc}`results_calibration_detail`.", "",
              "```{toctree}", ":hidden:", "", "results_calibration_real", "results_calibration_detail", "```", ""]
    return lines


def _bench(root: Path, name: str) -> Dict:
    return _load(root, f"benchmarks/results/{name}")


def _timing(entry: Dict) -> str:
    runs = entry["wall_s_all_repeats"]
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{entry['wall_s']:.2f} s{spread}, {entry['peak_mem_mib']:.0f} MiB"


def performance_page(root: Path) -> List[str]:
    """RelP against AtP: time and peak memory on GPT-2 small shapes, from the benchmark JSON."""
    rows = []
    for name in ("compare_relp_atp_T64_reduce_sum.json", "compare_relp_atp_T64_reduce_none.json",
                 "scale_T64_512_1024_B1.json"):
        bench = _bench(root, name)
        setup = bench["setup"]
        by_len: Dict[int, Dict[str, Dict]] = {}
        for r in bench["results"]:
            by_len.setdefault(r["seq_len"], {})[r["method"]] = r["current"]
        for seq_len, methods in sorted(by_len.items()):
            atp, relp = methods["AtP"], methods["RelP"]
            rows.append([f"B={setup['n_prompts']}, T={seq_len}, `reduce={setup['reduce']}`", setup["repeats"],
                         _timing(atp), _timing(relp), NOT_RUN, NOT_RUN,
                         f"{relp['wall_s'] / atp['wall_s']:.2f}, {relp['peak_mem_mib'] / atp['peak_mem_mib']:.2f}",
                         f"`benchmarks/results/{name}`"])
    lines = ["# Performance", "",
             "What does RelP cost next to AtP? GPT-2 small shapes (124M parameters, random weights, all 36 "
             "components), one thread, fp32, CPU; each cell the median time of N runs (their range in brackets) "
             "and the peak memory above setup. Measured on a shared 2-core machine: read the ratios (measured "
             "side by side), not the absolute times.", ""]
    lines += _table(["shape", "N runs", *COLUMNS, "RelP / AtP: time, memory", "JSON"], rows, 2)
    lines += ["Activation patching strategies, RelP against the authors' fork, the cost against the previous "
              "version and the memory model for long prompts: below.", "",
              "```{include} results_performance_detail.md", "```", ""]
    return lines


QUESTIONS = (("Does RelP reproduce the paper's Table 5 pattern?", "results_paper"),
             ("Does it hold on real pretrained models?", "results_real_models"),
             ("Edge circuits, and MIB's convention", "results_edges_mib"),
             ("Do calibrated rules help on held-out pairs?", "results_calibration_summary"),
             ("What does it cost?", "results_performance"))


def index_page(root: Path) -> List[str]:
    """One row per question: its page and its headline numbers, read from the same JSON."""
    tiny = _load(root, f"{RESULTS}/ioi-tiny-gpt2-ioi/ioi_results.json")
    smol = _load(root, f"{RESULTS}/smollm2/results.json")["ioi"]
    gemma = _load(root, f"{RESULTS}/gemma3/results.json")["ioi"]
    edges = _load(root, f"{RESULTS}/edges-tiny-gpt2-ioi-ioi/edges_results.json")["conventions"]["library"]
    scale = {(r["seq_len"], r["method"]): r["current"] for r in _bench(root, "scale_T64_512_1024_B1.json")["results"]}

    def pcc(result, kind="mlp"):
        per = result["pcc"]["per_prompt"][kind]
        return ", ".join(f"{m} {per[m][0]:.3f}" for m in ("AtP", "RelP", "RelP+AH"))

    counts = calibration_counts(root)
    mlp = tiny["pcc_per_prompt"]["mlp"]
    heads = [f"`tiny-gpt2-ioi`, MLP outputs, N = {tiny['config']['n_prompts']}: "
             + ", ".join(f"{m} {mlp[m]:.3f}" for m in ("AtP", "RelP", "RelP+AH")),
             f"IOI MLP outputs: SmolLM2-135M (N = {smol['n']}) {pcc(smol)}; Gemma-3 270M (N = {gemma['n']}) "
             f"{pcc(gemma)}",
             "`tiny-gpt2-ioi` IOI CPR: " + ", ".join(f"{t} {edges['methods'][m]['cpr']:.3f}" for t, m in EDGE_COLUMNS[:3]),
             f"default `best-preset`: calibrated RelP {_calibration_sentence(counts[tables.BEST_PRESET])}; "
             f"default `gradient`: {_calibration_sentence(counts[tables.GRADIENT])}",
             "RelP / AtP at T=1024: time "
             f"{scale[(1024, 'RelP')]['wall_s'] / scale[(1024, 'AtP')]['wall_s']:.2f}, memory "
             f"{scale[(1024, 'RelP')]['peak_mem_mib'] / scale[(1024, 'AtP')]['peak_mem_mib']:.2f}"]
    lines = ["# Results", "",
             "One page per question; each opens with its summary table (methods in the order AtP, RelP, RelP+AH, "
             "calibrated; N and 95% intervals where the measurement kept them) and links to its detail.", ""]
    lines += _table(["question", "page", "in short"],
                    [[q, f"{{doc}}`{page}`", head] for (q, page), head in zip(QUESTIONS, heads)], 3)
    lines += ["```{toctree}", ":hidden:", ""] + [page for _, page in QUESTIONS] + ["results_embedded", "```", ""]
    return lines


PAGES = {"results.md": index_page, "results_paper.md": paper_page, "results_real_models.md": real_models_page,
         "results_edges_mib.md": edges_page, "results_calibration_summary.md": calibration_page,
         "results_performance.md": performance_page}
"""Each page this script writes, and the function that renders it."""


def render_pages(root: Path, version: str, date: str) -> Dict[str, str]:
    """The text of every page of :data:`PAGES`, from the JSON under ``root``.

    Args:
        root (Path): the repository root.
        version (str): the captum-relp version named in each page's footer.
        date (str): the date named there (``YYYY-MM-DD``).

    Returns:
        dict: page file name -> Markdown text.

    Example:
        >>> pages = render_pages(ROOT, "0.0", "2025-01-01")
        >>> sorted(pages) == sorted(PAGES) and pages["results.md"].startswith("# Results")
        True
    """
    command = "python scripts/results_pages.py"
    out = {}
    for name, render in PAGES.items():
        out[name] = "\n".join(render(root) + _footer(command, "the JSON files the tables name", version, date))
    return out


def page_date(text: str) -> Optional[str]:
    """The date in the footer of a page written by this script, or None."""
    marker = text.rfind("(captum-relp ")
    return None if marker < 0 else text[marker:].split(", ", 1)[1].split(")", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the footers")
    args = parser.parse_args()
    import captum_relp

    for name, text in render_pages(ROOT, captum_relp.__version__, args.date).items():
        (ROOT / "docs" / name).write_text(text)
        print(f"wrote docs/{name}")


if __name__ == "__main__":
    main()
