"""Measure edge circuits under the library's and MIB's conventions and write ``docs/results_edges.md``.

For each model and task: edge scores of RelP, RelP-AH, RelP-AH with local q/k pattern
gradients (``relp-ah-qk``, one pass), RelP-AH with RelP's q/k edges (``relp-ah+qk``, two
passes), EAP, EAP-IG (each convention's grid) and exact edge patching on ``--n-prompts`` pairs
(scoring times: minimum over ``--repeats`` interleaved runs, so ratios are side by side); circuits evaluated on ``--n-eval`` other pairs under both
conventions; 95% percentile-bootstrap intervals over the evaluation prompts (``--bootstrap``
resamples; circuits fixed) for CPR and CMD, and for RelP minus EAP (paired resamples). Writes
``docs/_static/results/edges-<model>-<task>/`` (JSON; ``edges_scores.npz``: every method's per-edge
scores per convention, ``<convention>/edges`` and ``<convention>/<method>``; PNGs) and the page.

    OMP_NUM_THREADS=1 python scripts/make_edge_results.py                    # shipped models
    python scripts/make_edge_results.py --model <dir> --task ioi --no-exact --page-section out.md

Grouped-query models (SmolLM2-135M: 9 query heads, 3 key/value heads) get two graphs: the
library convention's, with one key and one value input per key/value head, and MIB's, with
one per query head (more edges, so a different ``n`` behind every fraction); each section
states both edge counts. Exact edge patching is one run per edge: skip it there (``--no-exact``)
and score sampled edges instead, merged into the saved JSON, then re-render::

    OMP_NUM_THREADS=1 python scripts/make_edge_results.py --model smollm2-135m --conventions library \\
        --exact-sample 300
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from captum_relp.edges import (
    EdgeScores,
    FaithfulnessCurve,
    build_graph,
    edge_scores,
    exact_edge_scores,
    faithfulness_curve,
    pearson,
)
from captum_relp.edges.conventions import CONVENTIONS
from captum_relp.embedded import EMBEDDED_MODELS, heldout_words, load_model
from captum_relp.experiments.edges import SCORES_FILE, edge_score_arrays, make_batch
from captum_relp.plotting import plot_edge_circuit, plot_faithfulness_curves

from _edge_sample import ci, method_scores, percentiles, sample_section, sampled_pcc  # noqa: E402  (scripts/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "results"
PAGE = ROOT / "docs" / "results_edges.md"
METHODS = ("relp", "relp-ah", "relp-ah-qk", "relp-ah+qk", "eap", "eap-ig")
COMPARED = ("relp", "relp-ah-qk", "relp-ah+qk")  # differences to EAP with paired intervals
KINDS = ("q", "k", "v", "mlp", "logits")


def _kind(name: str) -> str:
    return name.split("<")[1].rstrip(">") if "<" in name else ("logits" if name == "logits" else "mlp")


def score(model, graph, batch, grid: str, n_steps: int, exact: bool, repeats: int) -> Dict[str, EdgeScores]:
    """Every method's scores; times are the minimum over ``repeats`` interleaved runs after a warm-up."""
    args = (model, graph, batch.clean_ids, batch.corrupt_ids, batch.metric(), batch.attention_mask)
    edge_scores(*args, method="eap")  # warm-up
    runs: Dict[str, List[EdgeScores]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:
            runs[method].append(edge_scores(*args, method=method, n_steps=n_steps, ig_grid=grid))
    out = {m: min(r, key=lambda result: result.seconds) for m, r in runs.items()}
    if exact:
        out["exact"] = exact_edge_scores(*args)
    return out


def intervals(curves, n_boot: int, seed: int = 0) -> Dict[str, Dict[str, List[float]]]:
    """95% percentile intervals of CPR, CMD per method and of RelP - EAP (paired resamples)."""
    n = len(next(iter(curves.values())).prompt_metrics["full"])
    gen = torch.Generator().manual_seed(seed)
    draws: Dict[str, Dict[str, List[float]]] = {m: {"cpr": [], "cmd": []} for m in curves}
    for _ in range(n_boot):
        index = torch.randint(n, (n,), generator=gen)
        for method, curve in curves.items():
            for key, value in curve.resample(index).items():
                draws[method][key].append(value)
    out = {}
    for method in curves:
        out[method] = {key: percentiles(values) for key, values in draws[method].items()}
    for other in COMPARED:
        if other in curves and "eap" in curves:
            out[f"{other}-minus-eap"] = {
                key: percentiles([a - b for a, b in zip(draws[other][key], draws["eap"][key])])
                for key in ("cpr", "cmd")}
    return out


def pcc_by_kind(graph, mine: EdgeScores, exact: EdgeScores) -> Dict[str, float]:
    kinds = [_kind(graph.downstream[v]) for _, v in graph.edges()]
    a, b = mine.edge_vector(graph), exact.edge_vector(graph)
    out = {"all": pearson(a, b)}
    for kind in KINDS:
        rows = torch.tensor([k == kind for k in kinds])
        out[kind] = pearson(a[rows], b[rows])
    return out


def run_cell(name: str, task: str, args) -> Dict:
    model, tokenizer = load_model(name)
    model.eval()
    words = heldout_words(name, task)
    batch = make_batch(tokenizer, task, args.n_prompts, 0, words)
    held = make_batch(tokenizer, task, args.n_eval, 1, words)
    folder = OUT / f"edges-{Path(name).name}-{task}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cell: Dict = {"model": name, "task": task, "n_prompts": len(batch), "n_eval": len(held), "conventions": {}}
    exact_scores, arrays = None, {}
    for convention_name in args.conventions:
        convention = CONVENTIONS[convention_name]
        began = time.time()
        graph = build_graph(model, ungroup_kv=convention.ungroup_kv)
        reuse = exact_scores is not None and exact_scores[0].n_edges == graph.n_edges
        scores = score(model, graph, batch, convention.ig_grid, args.n_steps, args.exact and not reuse,
                       args.repeats)
        if reuse:
            scores["exact"] = exact_scores[1]
        elif "exact" in scores:
            exact_scores = (graph, scores["exact"])
        curves = {m: faithfulness_curve(model, graph, s.scores, held.clean_ids, held.corrupt_ids, held.metric(),
                                        held.attention_mask, convention=convention) for m, s in scores.items()}
        eap_seconds = scores["eap"].seconds
        entry = {"convention": convention.as_dict(), "n_edges": graph.n_edges, "ungrouped_kv": graph.ungrouped,
                 "intervals": intervals(curves, args.bootstrap), "methods": {}}
        for method, result in scores.items():
            entry["methods"][method] = {
                "cpr": curves[method].cpr, "cmd": curves[method].cmd, "curve": curves[method].as_dict(),
                "seconds": result.seconds, "time_vs_eap": result.seconds / eap_seconds,
                "n_forward": result.n_forward, "n_backward": result.n_backward,
                "pcc_vs_exact": pcc_by_kind(graph, result, scores["exact"]) if "exact" in scores else None}
        cell["conventions"][convention_name] = entry
        arrays.update(edge_score_arrays(graph, scores, prefix=f"{convention_name}/"))
        plot_faithfulness_curves(curves, f"{name}, {task}, {convention_name} convention",
                                 folder / f"edges_faithfulness_{convention_name}.png")
        if convention_name == args.conventions[0]:
            for method in ("relp", "eap-ig"):
                plot_edge_circuit(scores[method].scores, graph, 20, f"{name}, {task}: {method}, greedy connected "
                                  "circuit of 20 edges", folder / f"edges_circuit_{method}.png", method=method)
        print(f"{name} {task} {convention_name}: {time.time() - began:.0f}s " + ", ".join(
            f"{m} {curves[m].cpr:.3f}/{curves[m].cmd:.3f}" for m in curves), flush=True)
    (folder / "edges_results.json").write_text(json.dumps(cell, indent=1))
    np.savez_compressed(folder / SCORES_FILE, **arrays)
    return cell


def add_exact_sample(name: str, task: str, args) -> None:
    """``--exact-sample N``: exact scores of sampled edges, merged into the saved cell's JSON."""
    path = OUT / f"edges-{Path(name).name}-{task}" / "edges_results.json"
    cell = json.loads(path.read_text())  # the cell's scoring prompts, as measured
    convention = CONVENTIONS[args.conventions[0]]
    entry = cell["conventions"][convention.name]
    model, tokenizer = load_model(name)
    model.eval()
    batch = make_batch(tokenizer, task, cell["n_prompts"], 0, heldout_words(name, task))
    graph = build_graph(model, ungroup_kv=convention.ungroup_kv)
    if graph.n_edges != entry["n_edges"]:
        raise RuntimeError(f"{path}: {entry['n_edges']} edges saved, the graph has {graph.n_edges}")
    began = time.time()
    scores = method_scores(model, graph, batch, METHODS, convention.ig_grid, args.n_steps)
    print(f"{name} {task} {convention.name}: method scores in {time.time() - began:.0f}s", flush=True)
    entry["exact_sample"] = sampled_pcc(model, graph, batch, scores, args.exact_sample, args.exact_seed,
                                        args.exact_top, 1000, args.exact_max_rows)
    path.write_text(json.dumps(cell, indent=1))
    print(f"wrote {path} ({time.time() - began:.0f}s)", flush=True)


def section(cell: Dict) -> str:
    name, task = cell["model"], cell["task"]
    short = Path(name).name
    first = next(iter(cell["conventions"].values()))
    lines = [f"### {short}, {task.upper()}", "",
             f"{cell['n_prompts']} scoring and {cell['n_eval']} evaluation prompt pairs; "
             + "; ".join(f"{c}: {e['n_edges']} edges" + (" (key/value ungrouped)" if e["ungrouped_kv"] else "")
                         for c, e in cell["conventions"].items())
             + _graph_note(cell) + "."
             + ("" if "exact" in first["methods"] else
                " Exact edge patching of every edge not run (one patched run per edge is too costly at this "
                "size), so no all-edge PCC column" + ("; PCC on sampled edges below." if any(
                    "exact_sample" in e for e in cell["conventions"].values()) else "."))
             + ("" if (OUT / f"edges-{short}-{task}" / SCORES_FILE).exists() else
                " The per-edge scores of this cell are not shipped, so its PCCs cannot be recomputed from "
                "the published files."), "",
             "| method | " + " | ".join(f"CPR {c} | CMD {c}" for c in cell["conventions"])
             + " | PCC vs exact (all / q / k / v) | time / EAP |",
             "|---|" + "---:|" * (2 * len(cell["conventions"]) + 2)]
    for method in (*METHODS, "exact"):
        if method not in first["methods"]:
            continue
        row = [method]
        for entry in cell["conventions"].values():
            m, intervals = entry["methods"][method], entry["intervals"][method]
            row += [ci(m["cpr"], intervals["cpr"]), ci(m["cmd"], intervals["cmd"])]
        pcc = first["methods"][method]["pcc_vs_exact"]
        row.append("-" if pcc is None or method == "exact" else
                   " / ".join("-" if pcc[k] != pcc[k] else f"{pcc[k]:.2f}" for k in ("all", "q", "k", "v")))
        row.append("-" if method == "exact" else f"{first['methods'][method]['time_vs_eap']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    folder = f"_static/results/edges-{short}-{task}"
    lines += ["", reading(cell), ""]
    for convention, entry in cell["conventions"].items():
        if "exact_sample" in entry:
            lines += sample_section(convention, entry["exact_sample"], METHODS) + [""]
    lines += [f"![faithfulness, {c}]({folder}/edges_faithfulness_{c}.png)" for c in cell["conventions"]]
    lines += ["", f"![RelP circuit]({folder}/edges_circuit_relp.png) "
              f"![EAP-IG circuit]({folder}/edges_circuit_eap-ig.png)", ""]
    return "\n".join(lines)


def _graph_note(cell: Dict) -> str:
    entries = cell["conventions"]
    if len(entries) == 1:
        entry = next(iter(entries.values()))
        return (" (one key and one value input per key/value head)" if not entry["ungrouped_kv"] else "") + \
            f"; only the {next(iter(entries))} convention was run"
    return "" if len({e["n_edges"] for e in entries.values()}) > 1 else ", the same graph (no grouped-query attention)"


def reading(cell: Dict) -> str:
    """Where RelP (and the q/k hybrid) beat or lose to EAP and EAP-IG, judged by the intervals."""
    sentences = []
    for convention, entry in cell["conventions"].items():
        parts = []
        for method in COMPARED:
            diff = entry["intervals"].get(f"{method}-minus-eap")
            if diff is None:
                continue
            verdicts = []
            for key in ("cpr", "cmd"):
                lo, hi = diff[key]
                better, worse = (lo > 0, hi < 0) if key == "cpr" else (hi < 0, lo > 0)
                delta = entry["methods"][method][key] - entry["methods"]["eap"][key]
                verdicts.append(f"{'better' if better else 'worse' if worse else 'same within noise:'} "
                                f"{key.upper()} ({delta:+.3f}, interval [{lo:+.3f}, {hi:+.3f}])")
            ig = entry["intervals"]["eap-ig"]["cpr"]
            mine = entry["methods"][method]["cpr"]
            position = "inside" if ig[0] <= mine <= ig[1] else ("above" if mine > ig[1] else "below")
            parts.append(f"{method} vs EAP: {', '.join(verdicts)}; its CPR is {position} EAP-IG's interval")
        sentences.append(f"{convention}: " + "; ".join(parts) + ".")
    return " ".join(sentences)


def summary(cells: List[Dict]) -> List[str]:
    """One row per model, task and convention: CPR/CMD differences to EAP with intervals, CPRs, cost."""
    lines = ["| model | task | convention | relp - eap (CPR) | relp-ah-qk - eap (CPR) | relp-ah-qk - eap (CMD) "
             "| relp-ah+qk - eap (CPR) | CPR relp / relp-ah-qk / relp-ah+qk / eap / eap-ig "
             "| time / EAP: relp-ah-qk, relp-ah+qk |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        for convention, entry in cell["conventions"].items():
            m, intervals = entry["methods"], entry["intervals"]

            def diff(method, key):
                return ci(m[method][key] - m["eap"][key], intervals[f"{method}-minus-eap"][key], signed=True)

            lines.append(f"| {Path(cell['model']).name} | {cell['task']} | {convention} | {diff('relp', 'cpr')} | "
                         f"{diff('relp-ah-qk', 'cpr')} | {diff('relp-ah-qk', 'cmd')} | {diff('relp-ah+qk', 'cpr')} | "
                         + " / ".join(f"{m[k]['cpr']:.3f}" for k in ("relp", "relp-ah-qk", "relp-ah+qk", "eap",
                                                                      "eap-ig"))
                         + f" | {m['relp-ah-qk']['time_vs_eap']:.2f}, {m['relp-ah+qk']['time_vs_eap']:.2f} |")
    return lines + [""]


def replot(cell: Dict) -> None:
    """Redraw the faithfulness figures of a saved cell (no model runs)."""
    folder = OUT / f"edges-{Path(cell['model']).name}-{cell['task']}"
    for convention, entry in cell["conventions"].items():
        curves = {}
        for method, m in entry["methods"].items():
            c = m["curve"]
            curves[method] = FaithfulnessCurve(c["fractions"], c["n_edges"], c["faithfulness"], c["cpr"], c["cmd"],
                                               faithfulness_cpr=c["faithfulness_cpr"])
        plot_faithfulness_curves(curves, f"{cell['model']}, {cell['task']}, {convention} convention",
                                 folder / f"edges_faithfulness_{convention}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model name or directory (repeatable); default: shipped")
    parser.add_argument("--task", action="append", choices=("ioi", "sva"), help="default: ioi and sva")
    parser.add_argument("--conventions", default="library,mib")
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--n-eval", type=int, default=20)
    parser.add_argument("--n-steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs per method (min taken)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the evaluation prompts")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="skip exact edge patching")
    parser.add_argument("--page-section", default=None, help="write only this model's sections to this file")
    parser.add_argument("--from-json", action="store_true", help="rewrite the page from the saved JSON files")
    parser.add_argument("--minutes", type=float, default=None, help="with --from-json: the measured duration")
    parser.add_argument("--header-note", default=None, help="a paragraph added under the page header")
    parser.add_argument("--exact-sample", type=int, default=None, metavar="N",
                        help="exact edge patching of N uniformly sampled edges and of the top-edge union, on a saved "
                             "cell's scoring prompts (first convention); merged into its JSON, page not written")
    parser.add_argument("--exact-seed", type=int, default=0, help="seed of the uniform edge sample")
    parser.add_argument("--exact-top", type=int, default=50, help="top edges per method in the scored union")
    parser.add_argument("--exact-max-rows", type=int, default=64, help="rows per patched forward (memory)")
    args = parser.parse_args()
    args.conventions = args.conventions.split(",")
    torch.manual_seed(0)
    began = time.time()
    pairs = [(name, task) for name in (args.model or EMBEDDED_MODELS) for task in (args.task or ("ioi", "sva"))]
    if args.exact_sample is not None:
        for name, task in pairs:
            add_exact_sample(name, task, args)
        return
    if args.from_json:
        files = [OUT / f"edges-{Path(n).name}-{t}" / "edges_results.json" for n, t in pairs]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            print("not measured, left off the page: " + ", ".join(missing))
        cells = [json.loads(f.read_text()) for f in files if f.exists()]
        for cell in cells:
            replot(cell)
    else:
        cells = [run_cell(name, task, args) for name, task in pairs]
    body = summary(cells) + [section(cell) for cell in cells]
    if args.page_section:
        Path(args.page_section).write_text("\n".join(body))
        return
    header = [
        "## Edge circuits", "",
        f"Measured by `OMP_NUM_THREADS=1 python scripts/make_edge_results.py` (`--n-prompts {args.n_prompts} "
        f"--n-eval {args.n_eval} --bootstrap {args.bootstrap} --repeats {args.repeats}`) in "
        f"{args.minutes or (time.time() - began) / 60:.1f} minutes on "
        f"{platform.machine()} CPU (2 shared cores), torch {torch.__version__}. Held-out names/nouns. "
        "Both conventions of [Edge-level RelP](edges.md) on the same scoring prompts (EAP-IG: 5 steps, each "
        "convention's grid; other scores are the same in both when the model has no grouped-query attention). "
        "Brackets: 95% percentile bootstrap over the evaluation prompts, circuits fixed (it does not include "
        "the variation from the scoring prompts). `relp-ah-qk` is RelP-AH whose query and key inputs get each "
        "head's local attention-pattern gradient in the same pass (one backward); `relp-ah+qk` takes its q and "
        "k edges from a second, RelP pass (two backwards). Times: the minimum over `--repeats` interleaved "
        "runs of each method in one process, on a shared machine.", ""]
    if args.header_note:
        header += [args.header_note, ""]
    PAGE.write_text("\n".join(header + body))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
