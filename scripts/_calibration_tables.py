"""Tables and sections of the held-out calibration study (``scripts/calibration_eval.py``), per default.

Every run of a study row was chosen with one default (``run["default"]``: ``"best-preset"``, the
library's, or ``"gradient"``, the previous one; runs without the field, e.g. SmolLM2-135M's study,
were chosen with the gradient). Each held-out cell has the PCC with AP of AtP, the presets and the
calibrated choice, calibrated - AtP and (where measured) calibrated - best preset with their paired
intervals; "below beyond the noise" means that interval lies entirely below zero.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

BEST_PRESET = "best-preset"
GRADIENT = "gradient"
METHODS = ("AtP", "RelP (preset)", "RelP+AH", "RelP (calibrated)")
SHORT = {"AtP": "AtP", "RelP (preset)": "RelP", "RelP+AH": "RelP+AH"}
NOT_RUN = "not run"
LISTED = 8
"""Below this many cases the size study names each one; above, it counts them per model."""
TITLES = {BEST_PRESET: "`best-preset` (the library's)", GRADIENT: "`gradient` (AtP kept unless beaten)"}


def run_default(run: Dict) -> str:
    """The default a run was chosen with (runs that do not say: the gradient)."""
    return run.get("default", GRADIENT)


def main_run(row: Dict, size: int, default: str) -> Optional[Dict]:
    """The run of ``row`` on the first ``size`` pool pairs chosen with ``default`` (None if not measured)."""
    return next((r for r in row["runs"] if r["size"] == size and r["draw"] == 0 and run_default(r) == default), None)


def below(cell: Dict, key: str = "diff_interval") -> bool:
    """``cell``'s interval of calibrated - AtP (``key="best_diff_interval"``: - best preset) is below zero."""
    interval = cell.get(key)
    return bool(interval) and interval[1] < 0


def cell_text(value: Optional[float], interval: Optional[List[float]] = None) -> str:
    """``0.842 [0.801, 0.880]``; ``-2.6e-04 [-4.7e-04, -3.5e-05]`` when a non-zero value or bound would
    round to 0.000; ``not run`` for a value the study does not have."""
    if value is None:
        return NOT_RUN
    if interval and any(0 < abs(x) < 0.0005 for x in (value, *interval)):
        return f"{value:.1e} [{interval[0]:.1e}, {interval[1]:.1e}]"  # a non-zero bound that rounds to 0.000
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def best_text(cell: Dict) -> str:
    """Calibrated - best preset with its interval and the preset's name."""
    if cell.get("best_diff") is None:
        return NOT_RUN
    return f"{cell_text(cell['best_diff'], cell['best_diff_interval'])} ({SHORT[cell['best_preset']]})"


def _below_text(cell: Dict) -> str:
    found = [name for name, key in (("AtP", "diff_interval"), ("best preset", "best_diff_interval"))
             if below(cell, key)]
    return "**" + " and ".join(found) + "**" if found else "no"


def cells(rows: Iterable[Dict], size: int, default: str) -> List[Tuple[Dict, str, Dict, Dict]]:
    """``(row, kind, cell, run)`` of every component type of the main runs (``size`` pairs, ``default``)."""
    return [(row, kind, cell, run) for row in rows if (run := main_run(row, size, default)) is not None
            for kind, cell in run["held_out"].items()]


def main_table(results: List[Dict], size: int, default: str = BEST_PRESET) -> str:
    """Every method's held-out PCC with AP, calibrated on the first ``size`` pairs with ``default``."""
    head = ("| model | component | AtP | RelP (preset) | RelP+AH | RelP (calibrated) | calibrated - AtP | "
            "calibrated - best preset | choice (decision) | below beyond noise? |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, kind, cell, run in cells(results, size, default):
        lines.append(f"| {row['model']} | {kind} | "
                     + " | ".join(cell_text(cell.get(m), cell["interval"].get(m)) for m in METHODS)
                     + f" | {cell_text(cell['diff'], cell['diff_interval'])} | {best_text(cell)} | "
                     f"{cell['choice']} ({run['decisions'][kind]}) | {_below_text(cell)} |")
    return "\n".join(lines)


def counts(rows: Iterable[Dict], size: int, default: str) -> Dict[str, List[str]]:
    """``{"rows", "below_atp", "below_best", "best_measured"}``: ``model kind`` of the main runs' cells."""
    found = cells(rows, size, default)
    name = [f"{row['model']} {kind}" for row, kind, _, _ in found]
    return {"rows": name,
            "below_atp": [n for n, (_, _, c, _) in zip(name, found) if below(c)],
            "below_best": [n for n, (_, _, c, _) in zip(name, found) if below(c, "best_diff_interval")],
            "best_measured": [n for n, (_, _, c, _) in zip(name, found) if c.get("best_diff") is not None]}


def verdict(results: List[Dict], size: int, default: str) -> str:
    """One sentence: rows below AtP and below the best preset beyond the noise, named, and the largest deficits."""
    found = cells(results, size, default)
    c = counts(results, size, default)

    def named(key: str) -> str:
        return f" ({', '.join(c[key])})" if c[key] else ""

    text = (f"**Default {TITLES[default]}, {size} calibration pairs:** calibrated RelP is below AtP beyond the "
            f"noise in {len(c['below_atp'])} of {len(c['rows'])} rows{named('below_atp')} and below the best "
            f"preset beyond the noise in {len(c['below_best'])} of {len(c['best_measured'])} "
            f"rows{named('below_best')}")
    worst = min(found, key=lambda x: x[2]["diff"])
    text += f"; the largest point deficit to AtP is {worst[2]['diff']:+.3f} ({worst[0]['model']}, {worst[1]})"
    measured = [x for x in found if x[2].get("best_diff") is not None]
    if measured:
        worst = min(measured, key=lambda x: x[2]["best_diff"])
        text += (f", to the best preset {worst[2]['best_diff']:+.3f} ({worst[0]['model']}, {worst[1]}: "
                 f"{SHORT[worst[2]['best_preset']]})")
    return text + "."


def differing_table(results: List[Dict], size: int) -> Tuple[int, int, str]:
    """The cells whose gradient-default choice differs from the best-preset one: ``(count, of, table)``."""
    head = ("| model | component | choice, best preset (decision) | choice, gradient (decision) | "
            "RelP (calibrated), gradient | calibrated - AtP | calibrated - best preset | below beyond noise? |")
    lines, total = [head, "|" + "---|" * (head.count("|") - 1)], 0
    for row in results:
        ours, old = main_run(row, size, BEST_PRESET), main_run(row, size, GRADIENT)
        if ours is None or old is None:
            continue
        for kind, cell in old["held_out"].items():
            total += 1
            if cell["choice"] == ours["held_out"][kind]["choice"]:
                continue
            lines.append(f"| {row['model']} | {kind} | {ours['held_out'][kind]['choice']} "
                         f"({ours['decisions'][kind]}) | {cell['choice']} ({old['decisions'][kind]}) | "
                         f"{cell_text(cell['RelP (calibrated)'], cell['interval']['RelP (calibrated)'])} | "
                         f"{cell_text(cell['diff'], cell['diff_interval'])} | {best_text(cell)} | "
                         f"{_below_text(cell)} |")
    return len(lines) - 2, total, "\n".join(lines)


def _size_cell(res: Dict, size: int, default: str) -> str:
    runs = [r for r in res["runs"] if r["size"] == size and run_default(r) == default]
    group_cells = [cell for r in runs for cell in r["held_out"].values()]
    if not group_cells:
        return "not measured"
    diffs = [cell["diff"] for cell in group_cells]
    moved = sum(1 for r in runs for d in r["decisions"].values() if d == "chosen")
    text = f"{sum(diffs) / len(diffs):+.3f} (min {min(diffs):+.3f})"
    best = [cell["best_diff"] for cell in group_cells if cell.get("best_diff") is not None]
    if len(best) == len(group_cells):
        text += f", {sum(best) / len(best):+.3f} (min {min(best):+.3f})"
        return (text + f"; {moved}/{len(group_cells)} chosen; {sum(map(below, group_cells))}, "
                f"{sum(below(c, 'best_diff_interval') for c in group_cells)} below")
    return text + f"; {moved}/{len(group_cells)} chosen; {sum(map(below, group_cells))} below"


def size_table(results: List[Dict], sizes: List[int], default: str = BEST_PRESET) -> str:
    """Per model and size, over the subsets and component types chosen with ``default``: the mean and the
    worst of calibrated - AtP and of calibrated - best preset, the groups that left the default, and the
    counts below AtP and below the best preset beyond the noise (the best preset where measured)."""
    head = "| model | " + " | ".join(f"n = {s}" for s in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 1)]
    for res in results:
        if any(run_default(r) == default for r in res["runs"]):
            lines.append(f"| {res['model']} | " + " | ".join(_size_cell(res, s, default) for s in sizes) + " |")
    return "\n".join(lines)


def size_study_counts(rows: Iterable[Dict], default: str) -> Dict[str, int]:
    """Over every (model, size, subset, group) chosen with ``default``: the cases, and those below AtP and
    below the best preset beyond the noise."""
    found = [cell for row in rows for run in row["runs"] if run_default(run) == default
             for cell in run["held_out"].values()]
    return {"cases": len(found), "below_atp": sum(map(below, found)),
            "below_best": sum(below(cell, "best_diff_interval") for cell in found)}


def below_in_size_study(rows: List[Dict], default: str = BEST_PRESET, key: str = "diff_interval") -> str:
    """Every (model, size, subset, group) of the size study chosen with ``default`` whose interval of
    calibrated - AtP (``key="best_diff_interval"``: - best preset) lies below zero."""
    what = "AtP" if key == "diff_interval" else "the best preset"
    value = "diff" if key == "diff_interval" else "best_diff"
    found = [f"{row['model']}, n = {run['size']} (subset {run['draw']}), {group}: {cell['choice']}, "
             f"{cell[value]:+.3f} [{cell[key][0]:+.3f}, {cell[key][1]:+.3f}]"
             for row in rows for run in row["runs"] if run_default(run) == default
             for group, cell in run["held_out"].items() if below(cell, key)]
    n_groups = sum(len(run["held_out"]) for row in rows for run in row["runs"] if run_default(run) == default)
    head = (f"Default {TITLES[default]}: below {what} beyond the noise anywhere in the size study: {len(found)} "
            f"of {n_groups} (model, size, subset, component type) cases")
    if len(found) > LISTED:  # too many to list: the count per model
        per_model: Dict[str, int] = {}
        for text in found:
            model = text.split(", n = ")[0]
            per_model[model] = per_model.get(model, 0) + 1
        return head + ", per model: " + "; ".join(f"{m} {n}" for m, n in per_model.items()) + "."
    return head + (": " + "; ".join(found) + "." if found else ".")


def sections(results: List[Dict], size: int, sizes: List[int], coverage: str) -> List[str]:
    """The sections of ``docs/results_calibration.md`` after its introduction: the runs with the library's
    default, the same runs with the gradient, the family coverage (``coverage``) and the size study."""
    n_differ, n_cells, differing = differing_table(results, size)
    size_intro = ("Per size, over the calibration subsets of that size (the first pairs and random subsets; one "
                  "for the full pool) and the component types: the mean and the worst of held-out PCC(calibrated) "
                  "- PCC(AtP), then of PCC(calibrated) - PCC(best preset); how many groups left the default "
                  "(`chosen`); how many were below AtP, and below the best preset, beyond the noise (interval "
                  "entirely below zero). Rows measured at one calibration size only show the others as not "
                  "measured.")
    return [
        f"### Held-out Pearson with AP, calibrated on {size} pairs, default: best preset", "",
        main_table(results, size, BEST_PRESET), "",
        verdict(results, size, BEST_PRESET), "",
        "### The same runs with the gradient as default", "",
        verdict(results, size, GRADIENT), "",
        f"The gradient default chooses other rules than the best-preset default in {n_differ} of {n_cells} rows "
        + ("(the other rows are the same choice, with the same held-out numbers as above); those rows:"
           if n_differ else "(the same held-out numbers as above)."), "",
        *([differing, ""] if n_differ else []),
        "### Family table coverage", "",
        "Every family of the family table (`captum_relp/families/table.py`), the rows measuring it and the "
        "component types the table refuses (not measured, with the table's reason); the last column with the "
        f"best-preset default, {size} calibration pairs.", "",
        coverage, "",
        "### Calibration size, default: best preset", "", size_intro, "",
        size_table(results, sizes, BEST_PRESET), "",
        below_in_size_study(results, BEST_PRESET), "",
        below_in_size_study(results, BEST_PRESET, "best_diff_interval"), "",
        "### Calibration size, default: gradient", "", "The same subsets, chosen with the gradient as default.", "",
        size_table(results, sizes, GRADIENT), "",
        below_in_size_study(results, GRADIENT), "",
        below_in_size_study(results, GRADIENT, "best_diff_interval"), ""]
