"""Markdown pieces that several result scripts write: figures, tables, the PCC tables of the real
models and the report of a circuit experiment (one module, so no script imports another's internals)."""
from __future__ import annotations

import numpy as np

from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import COMPONENT_TITLES as KIND_TITLES

READ_AT = (10, 100)
"""Circuit sizes shown in the circuit tables."""


def figure(path: str, alt: str, caption: str) -> list:
    """A MyST figure that opens the PNG at full size when clicked."""
    return [f"```{{figure}} {path}", f":alt: {alt}", f":target: {path}", ":width: 100%", "", caption, "```", ""]


def table(header: list, rows: list) -> list:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _cell(entry, best):
    value, low, high = entry
    text = f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"**{text}**" if best else text


def pcc_rows(pcc: dict, methods) -> list:
    """One row per component kind of ``pcc[kind][method] = [value, low, high]``; the best method in bold."""
    rows = []
    for kind in KINDS:
        best = max(methods, key=lambda m: pcc[kind][m][0])
        rows.append([KIND_TITLES[kind]] + [_cell(pcc[kind][m], m == best) for m in methods])
    return rows


def pcc_losses(task: str, result: dict) -> list:
    """Sentences naming every cell where RelP's PCC is below AtP's."""
    out = []
    for view, title in (("per_prompt", "per-prompt"), ("prompt_averaged", "prompt-averaged")):
        for kind in KINDS:
            atp = result["pcc"][view][kind]["AtP"][0]
            for method in result["pcc"][view][kind]:
                value = result["pcc"][view][kind][method][0]
                if method != "AtP" and value < atp:
                    out.append(f"{task}, {KIND_TITLES[kind]}, {title}: {method} {value:.3f} < AtP {atp:.3f}")
    return out


METRIC_NAMES = {"sva": "probability difference of the right over the wrong verb",
                "ioi": "logit difference of the indirect object over the subject"}
"""What m is in each task's circuit experiment (SVAMetric is a ProbDiff, IOIMetric a LogitDiff)."""


def circuit_report(result, command: str, figure_path: str) -> list:
    """Denominators, faithfulness / completeness table, cost table and figure of a circuit experiment."""
    nodes = result.config["nodes"]
    methods = list(result.cost)
    denominators = result.denominators()
    lines = [command, "",
             f"Denominator of both ratios per setting (m = {METRIC_NAMES[result.config['task']]} on the test "
             "pairs):", ""]
    lines += table(["setting", "m(M)", "m(empty)", "m(M) - m(empty)", "s.e.", "ratios"],
                   [[s, f"{d['m_full']:.3f}", f"{d['m_empty']:.3f}", f"{d['denominator']:.3f}", f"{d['se']:.3f}",
                     "ok" if d["reliable"] else "**noisy** (under 3 s.e.)"] for s, d in denominators.items()])
    rows = []
    for setting, by_method in result.curves.items():
        for method in methods:
            curve = by_method[method]
            cells = []
            for size in READ_AT:
                i = curve.n_nodes.index(size) if size in curve.n_nodes else len(curve.n_nodes) - 1
                cells.append(f"{curve.faithfulness[i]:.2f} / {curve.completeness[i]:.2f}")
            rows.append([setting, method] + cells)
    lines += ["Faithfulness / completeness at two circuit sizes:", ""]
    lines += table(["setting", "method"] + [f"{k} nodes" for k in READ_AT], rows)
    base = result.cost.get("RelP", {}).get("seconds") or 1.0
    lines += ["Cost of the node effects (all settings, same run):", ""]
    lines += table(["method", "seconds", "ratio to RelP", "forward passes", "backward passes"],
                   [[m, f"{c['seconds']:.1f}", f"{c['seconds'] / base:.1f}x", int(c["forward_passes"]),
                     int(c["backward_passes"])] for m, c in result.cost.items()])
    size = READ_AT[0]
    noisy = [s for s, d in denominators.items() if not d["reliable"]]
    averaged = [s for s in result.curves if s not in noisy] or list(result.curves)  # as plot_faithfulness
    mean = {m: np.nanmean([result.curves[s][m].faithfulness[result.curves[s][m].n_nodes.index(size)]
                           for s in averaged]) for m in methods}
    peak = max((max(by[m].faithfulness), s) for s, by in result.curves.items() for m in methods)
    caption = (f"{result.title()}. At {size} nodes the mean faithfulness is "
               + ", ".join(f"{m} {v:.2f}" for m, v in mean.items())
               + (f"; bold lines show {averaged[0]}, the only setting with a reliable denominator, "
                  if len(averaged) == 1 < len(result.curves) else f"; bold lines average {', '.join(averaged)}, ")
               + "faint lines (one style each) show every setting. The highest value, "
               f"{peak[0]:.2f} in {peak[1]}, is a ratio over m(M) - m(empty) = "
               f"{denominators[peak[1]]['denominator']:.3f}: "
               + (f"{', '.join(noisy)} (hollow markers) {'has' if len(noisy) == 1 else 'have'} a denominator "
                  "under three standard errors, so read their curves as noise"
                  + ("; the axes show the range of the other settings." if len(averaged) < len(result.curves) else ".")
                  if noisy else "values above 1 mean the circuit alone beats the full model, not an error."))
    lines += figure(figure_path, f"faithfulness and completeness, {nodes}", caption)
    return lines
