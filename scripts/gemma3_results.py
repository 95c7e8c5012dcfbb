"""Gemma-3 270M, a second real architecture, in the layout of the paper's Table 5.

Fetch it first (Gemma Terms of Use: downloaded for measurements, never shipped)::

    python -m captum_relp.embedded.fetch gemma3-270m
    OMP_NUM_THREADS=1 python scripts/gemma3_results.py --n-ioi 50 --n-sva 50

(``--task ioi`` / ``--task sva`` measure one task and keep the other's saved numbers.)

IOI and SVA prompt pairs (the SmolLM2 page's tasks, positions and seeds: see
``_real_model_runs``), activation patching (AP) of the 3 x 18 components at the read
positions (:func:`_real_model.role_patching`: one prompt at a time, the clean key/value
cache reused; checked in the run against :class:`captum_relp.LayerActivationPatching`),
AtP / RelP / RelP+AH from the library, and their PCC with AP per component type,
per-prompt and prompt-averaged, with 95% bootstrap intervals over prompts. Writes
``docs/_static/results/gemma3/results.json`` (numbers only) and ``docs/results_gemma3.md``;
``--render-only`` rewrites the page from the JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from _real_model import check_against_library, gradient_scores, pcc_tables, pick, role_patching, sized_card
from _real_model_page import METHODS
from _report import pcc_losses, pcc_rows, table
from _real_model_runs import IOI_ROLES, SVA_LABELS, SVA_STRUCTURE, task_split
from captum_relp.embedded import load_model
from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import COMPONENT_TITLES as KIND_TITLES

NAME = "gemma3-270m"
ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "docs" / "_static" / "results" / "gemma3"
PICKS = (("resid", 4), ("attn", 9), ("mlp", 15))
"""Components whose AP is checked against the library's LayerActivationPatching on prompt 0."""


def _cpu() -> float:
    return time.process_time()


def sanity(model, tokenizer) -> Dict[str, object]:
    """Greedy next token of a factual prompt (does the dequantized model speak?)."""
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top = torch.topk(logits, 3).indices.tolist()
    return {"prompt": "The capital of France is", "top3": [tokenizer.decode([t]) for t in top]}


def measure_task(model, tokenizer, task: str, n: int, resamples: int) -> Dict[str, object]:
    """PCC tables, metric, wall and CPU times of one task on ``n`` pairs."""
    batch, positions, pairs = task_split(task, "eval", n, 0, tokenizer)
    with torch.no_grad():
        metric = batch.metric()(model(batch.clean_ids, attention_mask=batch.attention_mask).logits).double()
    began = time.perf_counter()
    check = check_against_library(model, batch, positions[0], PICKS)
    check_seconds = time.perf_counter() - began
    gradient, seconds = gradient_scores(model, batch)
    began, cpu = time.perf_counter(), _cpu()
    scores = {"AP": role_patching(model, batch, positions)}
    seconds = {"AP": time.perf_counter() - began, **seconds}
    ap_cpu = _cpu() - cpu
    scores.update({m: pick(v, positions) for m, v in gradient.items()})
    layers = scores["AP"].shape[1] // 3
    return {"n": n, "metric_mean": float(metric.mean()), "solved": float((metric > 0).float().mean()),
            "pcc": pcc_tables(scores, layers, resamples), "seconds": seconds, "ap_cpu_seconds": ap_cpu,
            "check_max_abs_diff": check, "check_seconds": check_seconds,
            "max_abs_ap": float(np.abs(scores["AP"]).max()), "prompts": [p.clean_prompt for p in pairs]}


def _compare(a, b) -> str:
    """``a`` against ``b`` (each ``[value, low, high]``): above / below when the intervals are disjoint."""
    if a[1] > b[2]:
        return "above"
    if a[2] < b[1]:
        return "below"
    return "not separable from (intervals overlap)"


def _reading(pcc: Dict) -> str:
    """One sentence per method against AtP, per component type, from the per-prompt intervals."""
    parts = []
    for method in METHODS[1:]:
        cells = [f"{KIND_TITLES[k]} {_compare(pcc[k][method], pcc[k]['AtP'])} "
                 f"({pcc[k][method][0]:.2f} vs {pcc[k]['AtP'][0]:.2f})" for k in KINDS]
        parts.append(f"{method} against AtP, per-prompt: " + "; ".join(cells) + ".")
    return "Reading: " + " ".join(parts)


def _task_lines(task: str, result: Dict, labels, note: str) -> List[str]:
    n, seconds = result["n"], result["seconds"]
    lines = [note, "",
             f"N = {n} prompt pairs; logit(right) > logit(wrong) on {result['solved']:.0%} of them, mean metric "
             f"({'probability' if task == 'sva' else 'logit'} difference) {result['metric_mean']:.3f}. Positions read: {', '.join(labels)}. Cells: PCC with AP "
             "[95% bootstrap interval over prompts, 1000 resamples]; bold = highest.", ""]
    for view, title in (("per_prompt", "Per-prompt maps"), ("prompt_averaged", "Prompt-averaged maps")):
        lines += [f"**{title}**", ""] + table(["component", *METHODS], pcc_rows(result["pcc"][view], METHODS))
    lines += [_reading(result["pcc"]["per_prompt"]), ""]
    losses = pcc_losses(task.upper(), result)
    lines += (["Where RelP loses to AtP: " + "; ".join(losses) + "."] if losses
              else ["RelP and RelP+AH are at or above AtP in every cell."]) + [""]
    lines += [f"Wall time, same run: AP {seconds['AP']:.0f} s ({result['ap_cpu_seconds']:.0f} CPU-s), "
              + ", ".join(f"{m} {seconds[m]:.1f} s" for m in METHODS)
              + f". AP here agrees with `LayerActivationPatching` on prompt 0 to "
              f"{result['check_max_abs_diff']:.1e} (largest AP effect {result['max_abs_ap']:.2f}).", ""]
    return lines


def _qk_norm_lines(record: Dict) -> List[str]:
    """The query/key-norm section: the rule the saved tables used, and ``qk_norms.json`` if measured."""
    lines = ["## Query/key norms", ""]
    if record.get("qk_norms") != "plain gradient":
        lines += ["The tables below were measured before version 0.2.0 changed the rule of the query/key norms "
                  "(`q_norm`, `k_norm`): their RelP columns give those norms the LN-rule, which the `\"relp\"` "
                  "preset no longer does (see {doc}`rules`); RelP+AH and AtP are unaffected.", ""]
    path = FOLDER / "qk_norms.json"
    if not path.exists():
        return lines
    probe = json.loads(path.read_text())
    pcc = probe["pcc"]["per_prompt"]
    lines += [f"`{probe['command']}` ({probe['wall_seconds'] / 60:.0f} min wall) compares, on the first "
              f"{probe['n']} IOI pairs below, RelP with the LN-rule on the query/key norms against RelP with "
              "their plain gradient. The attention scores are invariant to the scale of a query/key norm's "
              "input; the LN-rule makes them linear in it, so RelP scored rescalings of queries and keys as "
              "effects. Per-prompt PCC with AP [95% bootstrap interval over prompts]:", ""]
    lines += table(["component", *pcc[KINDS[0]]], pcc_rows(pcc, list(pcc[KINDS[0]])))
    return lines


TESTED = """**What the test suite checks.** The Gemma-3 family is tested on tiny random configurations
like every family of the table (forward unchanged by the rules, conservation, activation
patching against hooks, the independent RelP reference, edges). The checks on the real
Gemma-3 270M weights (`tests/embedded/test_real_model.py`) run only where the model has been
fetched, and the project's CI does not fetch it (its license lets it be downloaded on request,
not redistributed); `CAPTUM_RELP_REQUIRE_GEMMA3=1` makes them fail rather than skip. The
numbers on this page come from the command below, not from the test suite. Their per-prompt scores
are not shipped, so the test suite cannot recompute this page's PCCs either."""
"""What the tests cover on this model and what they do not (CI never fetches it)."""


def render(record: Dict) -> None:
    card = record["model_card"]
    lines = ["# Results on a second real model: Gemma-3 270M", "",
             "The SmolLM2-135M measurement ({doc}`results_smollm2`) repeated on a second real architecture, "
             "Gemma-3 (Google's 270M pretrained model), on this machine's CPU. Smaller N than the SmolLM2 page: "
             "the intervals say how much that costs.", "", "## Model card", "",
             f"- {card['description']}.",
             f"- License: {card['license']}. The weights are downloaded on request "
             "(`python -m captum_relp.embedded.fetch gemma3-270m`) and never shipped with captum-relp or its docs; "
             "this page holds numbers only.",
             f"- Quantization: {card['quantization']}. The attributions explain the dequantized model, which "
             "differs from the original bfloat16 weights by the quantization error.",
             f"- GGUF file `{card['file']}`, sha256 `{card['sha256']}`.",
             f"- Sanity: `{record['sanity']['prompt']}` -> top-3 next tokens "
             + ", ".join(f"`{t}`" for t in record["sanity"]["top3"]) + ".", "",
             "Gemma-3 specifics the rules handle (see the family table): embeddings scaled by sqrt(d) (before "
             "block 0, so outside the explained blocks), four RMSNorms per block (input, post-attention, "
             "pre- and post-feed-forward; weights stored as w - 1), RMSNorm on queries and keys, five "
             "sliding-window layers (window 512, longer than every prompt here) per global layer, gated "
             "GELU-tanh MLP, no logit soft-capping in this config, and a 262,144-token vocabulary (only "
             "the read positions go through the output head).", "",
             "The attention and MLP outputs scored are `self_attn.o_proj` and `mlp`, as for every Llama-style "
             "family; in Gemma-3 each passes through its own RMSNorm (`post_attention_layernorm`, "
             "`post_feedforward_layernorm`) before it joins the residual stream. AtP and RelP both take the "
             "gradient through the attention softmax; RelP+AH (the AH rule) holds the attention pattern fixed. "
             "The gap between RelP and RelP+AH below therefore comes from the softmax gradient alone.", "",
             TESTED, "",
             "Edge circuits of Gemma-3 270M on IOI (RelP, EAP, EAP-IG, sampled exact edges; CPR and CMD under the "
             "library's and MIB's conventions, with intervals) are on {doc}`results_edges_detail`, section "
             "\"gemma3-270m, IOI\"; calibrated rules against both presets on {doc}`results_calibration_real`.", "",
             "## How it was made", "",
             f"`{record['command']}` (torch {record['torch']}, {record['machine']} CPU, one thread, on a machine "
             "shared with other jobs; each task is its own process, `--task ioi` and `--task sva`). "
             + " ".join(f"{t.upper()}: {record[t]['wall_seconds'] / 60:.1f} min wall, model load included."
                        for t in ("ioi", "sva") if record.get(t))
             + " Results: `docs/_static/results/gemma3/results.json`.", ""]
    lines += _qk_norm_lines(record)
    for task, title, labels, note in (
            ("ioi", "IOI (Table 5 layout)", IOI_ROLES, "Templates: the package's three IOI templates, seed 0."),
            ("sva", "Subject-verb agreement (same layout)", SVA_LABELS,
             f"Structure `{SVA_STRUCTURE}` (`The officer that the editors help` -> is / are), seed 0.")):
        lines += [f"## {title}", ""]
        lines += _task_lines(task, record[task], labels, note) if record.get(task) else ["Not measured.", ""]
    (ROOT / "docs" / "results_gemma3.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ioi", type=int, default=50)
    parser.add_argument("--n-sva", type=int, default=50)
    parser.add_argument("--task", choices=("all", "ioi", "sva"), default="all",
                        help="measure one task only; the other's saved results are kept")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--render-only", action="store_true", help="rewrite the page from results.json")
    args = parser.parse_args()
    path = FOLDER / "results.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if not args.render_only:
        began = time.perf_counter()
        torch.manual_seed(0)
        model, tokenizer = load_model(NAME, "cpu", "float32")
        header = {"command": f"OMP_NUM_THREADS=1 python scripts/gemma3_results.py --n-ioi {args.n_ioi} "
                             f"--n-sva {args.n_sva}",
                  "model_card": sized_card(model), "torch": torch.__version__, "machine": platform.machine(),
                  "sanity": sanity(model, tokenizer), "qk_norms": "plain gradient"}
        for task, n in (("ioi", args.n_ioi), ("sva", args.n_sva)):
            if args.task in ("all", task):
                result = measure_task(model, tokenizer, task, n, args.resamples)
                result["wall_seconds"] = time.perf_counter() - began
                print(f"{time.strftime('%H:%M:%S')} {task}: {n} pairs", flush=True)
                FOLDER.mkdir(parents=True, exist_ok=True)
                # read again: the other task may run in a second process and have written meanwhile
                record = {**(json.loads(path.read_text()) if path.exists() else {}), **header, task: result}
                path.write_text(json.dumps(record, indent=2, default=float))
    render(record)


if __name__ == "__main__":
    main()
