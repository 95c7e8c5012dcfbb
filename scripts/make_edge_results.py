"""Measure the edge-level results on the embedded models and write ``docs/results_edges.md``.

Runs the edge experiment (RelP, RelP+AH, EAP, EAP-IG and exact edge patching) for
both embedded models on IOI and SVA, with held-out names/nouns, writes
``docs/_static/results/edges-<model>-<task>/`` (JSON, PNGs) and the markdown
section that ``docs/results.md`` includes.

    OMP_NUM_THREADS=1 python scripts/make_edge_results.py       # a few minutes on 2 cores
    python scripts/make_edge_results.py --from-json             # re-render only (seconds), no new numbers

Differences under ``TIE`` are reported as ties, and a CPR above exact patching's is
explained as overshoot (CPR is not bounded by 1).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from captum_relp.embedded import EMBEDDED_MODELS, heldout_words, load_embedded
from captum_relp.experiments.edges import METHOD_NAMES, SCORE_METHODS, run_edge_experiment

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "results"
PAGE = ROOT / "docs" / "results_edges.md"
TASKS = ("ioi", "sva")
SETTINGS = OUT / "edges_settings.json"
TIE = 0.01
"""Differences in CPR, CMD or PCC smaller than this are reported as ties."""
OVERSHOOT = 0.1
"""A curve peaking above 1 + OVERSHOOT gets a note: its CPR counts that overshoot as recovered behaviour."""


def run_one(name: str, task: str, n_prompts: int, n_eval: int, repeats: int):
    model, tokenizer = load_embedded(name)
    began = time.time()
    result = run_edge_experiment(model, tokenizer, task=task, methods=SCORE_METHODS, n_prompts=n_prompts,
                                 n_eval=n_eval, words=heldout_words(name, task), repeats=repeats,
                                 model_name=name)
    folder = OUT / f"edges-{name}-{task}"
    if folder.exists():
        shutil.rmtree(folder)
    result.save(folder, plots=True)
    for png in folder.glob("edges_circuit_*.png"):  # the page shows RelP's circuit only
        if png.name != "edges_circuit_relp.png":
            png.unlink()
    print(f"{name} {task}: {time.time() - began:.0f}s\n{result.format_table()}", flush=True)
    return result


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compare(a: float, b: float, more: str, less: str) -> str:
    """``more``/``less`` (a against b), or "about the same" when they differ by less than TIE.

    >>> compare(0.966, 0.959, "higher", "lower"), compare(0.90, 0.95, "higher", "lower")
    ('about the same', 'lower')
    """
    return "about the same" if abs(a - b) < TIE else (more if a > b else less)


def interpretation(summary) -> str:
    """Two sentences on RelP against EAP (and EAP-IG); differences under TIE are called ties."""
    relp, eap, ig = summary["relp"], summary["eap"], summary["eap-ig"]
    parts = [f"{compare(relp['cpr'], eap['cpr'], 'higher', 'lower')} CPR "
             f"({relp['cpr']:.3f} vs {eap['cpr']:.3f})",
             f"{compare(relp['cmd'], eap['cmd'], 'higher', 'lower')} CMD ({relp['cmd']:.3f} vs {eap['cmd']:.3f})",
             f"{compare(relp['pcc_vs_exact'], eap['pcc_vs_exact'], 'higher', 'lower')} PCC with exact patching "
             f"({relp['pcc_vs_exact']:.3f} vs {eap['pcc_vs_exact']:.3f})"]
    first = (f"Against EAP, RelP has {parts[0]}, {parts[1]} and {parts[2]} (differences under {TIE:g} "
             f"are ties); EAP-IG reaches CPR {ig['cpr']:.3f} and PCC {ig['pcc_vs_exact']:.3f} at "
             f"{ig['time_vs_eap']:.1f}x EAP's time.")
    by_relp, by_eap = relp["pcc_vs_exact_by_input"], eap["pcc_vs_exact_by_input"]
    kinds = [k for k in by_relp if by_relp[k] is not None and by_eap.get(k) is not None]
    losses = [k for k in kinds if by_relp[k] < by_eap[k] - TIE]
    if losses:
        second = ("By downstream input, RelP's edge scores correlate less with exact patching than EAP's on "
                  + ", ".join(f"{k} ({by_relp[k]:.3f} vs {by_eap[k]:.3f})" for k in losses)
                  + "; on the other inputs they correlate as well or better.")
    else:
        second = "By downstream input (q, k, v, MLP, logits), RelP's PCC is at least EAP's (within 0.01) on every kind."
    return first + " " + second


def cpr_note(summary) -> str:
    """Which methods' CPR is inflated by overshoot (f above 1 + OVERSHOOT on the curve); empty if none."""
    exact = summary["exact"]
    over = [m for m in SCORE_METHODS if max(summary[m]["curve"]["faithfulness"]) > 1 + OVERSHOOT]
    if not over:
        return ""
    return ("CPR is not bounded by 1: where f rises above 1 the circuit moves the metric further than the full "
            "model does, and that area counts toward CPR. " + " ".join(
                f"{METHOD_NAMES[m]}'s curve peaks at f = {max(summary[m]['curve']['faithfulness']):.2f}, so its "
                f"CPR {summary[m]['cpr']:.3f} includes overshoot; CMD, which counts overshoot as error, gives it "
                f"{summary[m]['cmd']:.3f}" + ("." if m == "exact" else
                                              f" against exact patching's {exact['cmd']:.3f}.") for m in over))


def section(name: str, task: str, summary) -> str:
    meta = summary["meta"]
    folder = f"_static/results/edges-{name}-{task}"
    lines = [f"### {name}, {task.upper()}", "",
             f"{meta['n_edges']} edges; {meta['n_prompts']} scoring and {meta['n_eval']} evaluation prompt pairs "
             f"with held-out {'names' if task == 'ioi' else 'nouns'}: `captum-relp edges --model {name} "
             f"--task {task} --method relp,relp-ah,eap,eap-ig --n-prompts {meta['n_prompts']} --repeats 3`.", "",
             "| method | CPR (higher better, unbounded) | CMD (lower better) | PCC vs exact | time / EAP "
             "| forward / backward |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in SCORE_METHODS:
        entry = summary[method]
        ratio = "-" if method == "exact" else fmt(entry["time_vs_eap"], 2)
        lines.append(f"| {METHOD_NAMES[method]} (`{method}`) | {entry['cpr']:.3f} | {entry['cmd']:.3f} | "
                     f"{fmt(entry['pcc_vs_exact'])} | {ratio} | {entry['n_forward']} / {entry['n_backward']} |")
    note = cpr_note(summary)
    lines += ["", f"![faithfulness curves]({folder}/edges_faithfulness.png)", "", interpretation(summary),
              *(["", note] if note else []), "",
              f"![top edges, RelP]({folder}/edges_circuit_relp.png)", "",
              _circuit_note(summary), ""]
    return "\n".join(lines)


def _circuit_note(summary) -> str:
    relp = {e for e, _ in summary["relp"]["top_edges"]}
    eap = {e for e, _ in summary["eap"]["top_edges"]}
    exact = {e for e, _ in summary["exact"]["top_edges"]}
    return (f"The 20 top-|score| edges of RelP share {len(relp & exact)} edges with the 20 top edges of exact "
            f"patching, EAP's share {len(eap & exact)}. "
            + ("RelP's top circuit is no closer to exact patching's than EAP's here."
               if len(relp & exact) <= len(eap & exact) else
               "RelP's top circuit is closer to exact patching's than EAP's here."))


def replot_curves(name: str, task: str, summary) -> None:
    """Redraw ``edges_faithfulness.png`` from the saved curves (method names as in the prose)."""
    from captum_relp.edges import FaithfulnessCurve
    from captum_relp.plotting import plot_faithfulness_curves

    curves = {}
    for method in SCORE_METHODS:
        c = summary[method]["curve"]
        curves[METHOD_NAMES[method]] = FaithfulnessCurve(c["fractions"], c["n_edges"], c["faithfulness"],
                                                         summary[method]["cpr"], summary[method]["cmd"])
    plot_faithfulness_curves(curves, f"{name}, {task}", OUT / f"edges-{name}-{task}" / "edges_faithfulness.png")


HEADER = ("CPR and CMD are the areas under the faithfulness curve f and under |1 - f| over the "
          "fraction of edges kept (MIB grid, trapezoid rule; see [Edge-level RelP](edges.md)). Higher CPR "
          "means more of the model's behaviour is recovered, but CPR is not bounded by 1 (f above 1 is a "
          "circuit that overshoots the full model), so compare CPR only together with CMD, where 0 is "
          "perfect. PCC is over all edges against exact edge patching; times are the minimum over the "
          "repeats, interleaved, in the same process, on a machine shared with other jobs: time ratios are "
          "noisy (ratios near 1 are within noise{spread}). Exact patching runs one patched forward per edge "
          "(batched over stacked copies of the prompts). Method names: RelP (`relp`), RelP+AH (`relp-ah`), "
          "EAP (`eap`), EAP-IG (`eap-ig`), exact edge patching (`exact`); the identifiers in code font are "
          "the values of `--method`.")


def render(summaries: dict, settings: dict) -> str:
    """The page from the saved summaries ``{(model, task): summary}`` and the run's settings."""
    ratios = [s["eap-ig"]["time_vs_eap"] for s in summaries.values()]
    spread = f"; EAP-IG's ratio ranged {min(ratios):.1f}x to {max(ratios):.1f}x" if ratios else ""
    header = ["## Edge circuits on the embedded models", "",
              "Measured by `python scripts/make_edge_results.py` "
              f"(`--n-prompts {settings['n_prompts']} --n-eval {settings['n_eval']} --repeats {settings['repeats']}`)"
              f" in {settings['minutes']:.1f} minutes on {settings['machine']} CPU, torch {settings['torch']}. "
              + HEADER.format(spread=spread), ""]
    body = [section(name, task, summary) for (name, task), summary in summaries.items()]
    return "\n".join(header + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--n-eval", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--from-json", action="store_true",
                        help="measure nothing: re-render the page (and the curve figures) from the saved JSON")
    args = parser.parse_args()
    summaries = {}
    if args.from_json:
        settings = json.loads(SETTINGS.read_text())
        for name in EMBEDDED_MODELS:
            for task in TASKS:
                path = OUT / f"edges-{name}-{task}" / "edges_results.json"
                summaries[(name, task)] = json.loads(path.read_text())
                replot_curves(name, task, summaries[(name, task)])
    else:
        torch.manual_seed(0)
        began = time.time()
        for name in EMBEDDED_MODELS:
            for task in TASKS:
                summaries[(name, task)] = run_one(name, task, args.n_prompts, args.n_eval, args.repeats).summary()
        settings = {"n_prompts": args.n_prompts, "n_eval": args.n_eval, "repeats": args.repeats,
                    "minutes": (time.time() - began) / 60, "machine": platform.machine(), "torch": torch.__version__}
        SETTINGS.write_text(json.dumps(settings))
    PAGE.write_text(render(summaries, settings))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
