"""Measure the edge-level results on the embedded models and write ``docs/results_edges.md``.

Runs the edge experiment (RelP, RelP-AH, EAP, EAP-IG and exact edge patching) for
both embedded models on IOI and SVA, with held-out names/nouns, writes
``docs/_static/results/edges-<model>-<task>/`` (JSON, PNGs) and the markdown
section that ``docs/results.md`` includes.

    OMP_NUM_THREADS=1 python scripts/make_edge_results.py       # a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import torch

from captum_relp.embedded import EMBEDDED_MODELS, heldout_words, load_embedded
from captum_relp.experiments.edges import SCORE_METHODS, run_edge_experiment

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "results"
PAGE = ROOT / "docs" / "results_edges.md"
TASKS = ("ioi", "sva")


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


def interpretation(summary) -> str:
    relp, eap, ig = summary["relp"], summary["eap"], summary["eap-ig"]
    wins = []
    wins.append("higher CPR" if relp["cpr"] > eap["cpr"] else "lower CPR")
    wins.append("lower CMD" if relp["cmd"] < eap["cmd"] else "higher CMD")
    wins.append("higher PCC with exact patching" if relp["pcc_vs_exact"] > eap["pcc_vs_exact"]
                else "lower PCC with exact patching")
    first = (f"RelP has {', '.join(wins[:2])} and {wins[2]} than EAP "
             f"(CPR {relp['cpr']:.3f} vs {eap['cpr']:.3f}, CMD {relp['cmd']:.3f} vs {eap['cmd']:.3f}, "
             f"PCC {relp['pcc_vs_exact']:.3f} vs {eap['pcc_vs_exact']:.3f}); EAP-IG reaches CPR {ig['cpr']:.3f} "
             f"and PCC {ig['pcc_vs_exact']:.3f} at {ig['time_vs_eap']:.1f}x EAP's time.")
    by_relp, by_eap = relp["pcc_vs_exact_by_input"], eap["pcc_vs_exact_by_input"]
    kinds = [k for k in by_relp if by_relp[k] is not None and by_eap.get(k) is not None]
    losses = [k for k in kinds if by_relp[k] < by_eap[k]]
    if losses:
        second = ("By downstream input, RelP's edge scores correlate less with exact patching than EAP's on "
                  + ", ".join(f"{k} ({by_relp[k]:.3f} vs {by_eap[k]:.3f})" for k in losses)
                  + "; on the other inputs they correlate at least as well.")
    else:
        second = "By downstream input (q, k, v, MLP, logits), RelP's PCC is at least EAP's on every kind."
    return first + " " + second


def section(name: str, task: str, result) -> str:
    summary = result.summary()
    meta = summary["meta"]
    folder = f"_static/results/edges-{name}-{task}"
    lines = [f"### {name}, {task.upper()}", "",
             f"{meta['n_edges']} edges; {meta['n_prompts']} scoring and {meta['n_eval']} evaluation prompt pairs "
             f"with held-out {'names' if task == 'ioi' else 'nouns'}: `captum-relp edges --model {name} "
             f"--task {task} --method relp,relp-ah,eap,eap-ig --n-prompts {meta['n_prompts']} --repeats 3`.", "",
             "| method | CPR (higher better) | CMD (lower better) | PCC vs exact | time / EAP | forward / backward |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in SCORE_METHODS:
        entry = summary[method]
        ratio = "-" if method == "exact" else fmt(entry["time_vs_eap"], 2)
        lines.append(f"| {method} | {entry['cpr']:.3f} | {entry['cmd']:.3f} | {fmt(entry['pcc_vs_exact'])} | "
                     f"{ratio} | {entry['n_forward']} / {entry['n_backward']} |")
    lines += ["", f"![faithfulness curves]({folder}/edges_faithfulness.png)", "", interpretation(summary), "",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--n-eval", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    began = time.time()
    body = []
    for name in EMBEDDED_MODELS:
        for task in TASKS:
            body.append(section(name, task, run_one(name, task, args.n_prompts, args.n_eval, args.repeats)))
    header = ["## Edge circuits on the embedded models", "",
              "Measured by `python scripts/make_edge_results.py` "
              f"(`--n-prompts {args.n_prompts} --n-eval {args.n_eval} --repeats {args.repeats}`) in "
              f"{(time.time() - began) / 60:.1f} minutes on {platform.machine()} CPU, torch {torch.__version__}. "
              "CPR and CMD are the areas under the faithfulness curve f and under |1 - f| over the "
              "fraction of edges kept (MIB grid, trapezoid rule; see [Edge-level RelP](edges.md)); PCC is "
              "over all edges against exact edge patching; times are the minimum over the repeats, "
              "interleaved, in the same process, on a machine shared with other jobs: time ratios are noisy "
              "(ratios near 1 are within noise). Exact patching runs one patched forward per edge (batched "
              "over stacked copies of the prompts).", ""]
    PAGE.write_text("\n".join(header + body))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
