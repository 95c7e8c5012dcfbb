"""``make_results.py --real-model``: SmolLM2-135M in the layout of the paper's Table 5.

Writes ``docs/_static/results/smollm2/`` (``results.json``, heatmaps) and
``docs/results_smollm2.md``.
"""
from __future__ import annotations

import datetime
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from _real_model import pcc_tables, sized_card
from _report import circuit_report, pcc_losses, pcc_rows, table
from _real_model_calibration import (CALIBRATION_PAIRS, DRAWS, GRADIENT, LIBRARY_DEFAULT, calibrated,
                                    chosen_names, study_rows)
from _real_model_runs import IOI_ROLES, SVA_LABELS, SVA_STRUCTURE, fill_candidates, load_split, measure
from _calibration_tables import main_table, size_table
from captum_relp.experiments import run_circuit_experiment
from captum_relp.embedded import load_model
from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import COMPONENT_TITLES as KIND_TITLES
from captum_relp.experiments.circuits import CircuitExperimentResult
from captum_relp.plotting import plot_faithfulness, plot_patching_heatmaps

NAME = "smollm2-135m"
METHODS = ("AtP", "RelP", "RelP+AH")
CALIBRATED = "RelP (calibrated)"


def _section(task, result, labels, folder, command_note):
    lines = [f"Prompts: N = {result['n']}; logit(correct) > logit(wrong) on "
             f"{result['solved']:.0%} of them (mean metric {result['metric_mean']:.2f}). {command_note}", ""]
    for view, title in (("per_prompt", "per-prompt maps (every prompt x layer x position value)"),
                        ("prompt_averaged", "prompt-averaged maps (layer x position)")):
        lines += [f"PCC with activation patching, {title}; 95% bootstrap interval over prompts in brackets, "
                  "best per row in bold:", ""]
        methods = list(result["pcc"][view]["resid"])
        lines += table(["component"] + methods, pcc_rows(result["pcc"][view], methods))
    losses = pcc_losses(task, result)
    lines += ["Where a RelP variant scores below AtP (point estimates; compare the intervals): " + ("; ".join(losses) + "." if losses else "nowhere in these tables."), ""]
    base = result["seconds"]["AtP"]
    lines += ["Wall time in the same runs (this CPU, one thread per process; every chunk timed each method back "
              "to back, so the ratios hold even though the machine was shared):", ""]
    lines += table(["method", "seconds", "ratio to AtP", "what ran"],
                   [[m, f"{s:.1f}", f"{s / base:.1f}x",
                     "the positions above, 90 patched copies per position (suffix from the clean KV cache)"
                     if m == "AP" else "every position, 2 forwards + 1 backward per batch"]
                    for m, s in result["seconds"].items()])
    for kind in KINDS:
        path = f"_static/results/smollm2/{task.lower()}_heatmap_{kind}.png"
        maps = {m: result["mean_maps"][m][kind] for m in ["AP", *METHODS]}
        plot_patching_heatmaps(maps, f"{task} {KIND_TITLES[kind]}", folder / Path(path).name, list(labels),
                               model_name=NAME, n_prompts=result["n"], xlabel="token role")
        ap = maps["AP"]
        layer, role = np.unravel_index(np.abs(ap).argmax(), ap.shape)
        lines += [f"```{{figure}} {path}", f":alt: {task} {KIND_TITLES[kind]} heatmaps, {NAME}",
                  f":target: {path}", ":width: 100%", "",
                  f"{task}, {KIND_TITLES[kind]}: mean over {result['n']} prompts. AP's largest effect is at "
                  f"{labels[role]}, layer {layer} ({ap[layer, role]:+.2f}).", "```", ""]
    return lines


def _card_lines(card):
    return [f"- **Model:** {card['name']} ({card['organization']}, license {card['license']}), "
            f"architecture `{card['architecture']}`, 30 layers, d = 576, 9 query and 3 key/value heads.",
            f"- **Source:** {card['source']}.",
            f"- **GGUF file:** `{card['file']}`, sha256 `{card['sha256']}`, file type {card['file_type']}; "
            "tensors: " + ", ".join(f"{n} {t}" for t, n in card["tensor_types"].items()) + ".",
            "- **Quantization caveat:** the matrices were stored 4-bit (Q4_1) and the embedding 8-bit; "
            "they are dequantized to float32 here. Every number on this page is about *this* dequantized "
            "model, which differs from the original bfloat16 SmolLM2-135M-Instruct by the quantization "
            "error; the attributions are exact for the model that ran, not for the original.", ""]


CIRCUITS = {"circuit": dict(task="sva", nodes="neurons", n_train=20, n_test=20),
            "circuit-ioi": dict(task="ioi", nodes="neurons", n_train=20, n_test=20)}
"""The SmolLM2 circuit runs (folder: settings): neuron circuits, small N (IG costs n_steps passes per batch)."""
METRIC_NOTES = {"sva": "the SVA metric is a probability difference and this model puts little probability on "
                       "either verb form",
                "ioi": "the IOI metric is the logit difference of the indirect object over the subject"}


def write_real_model_page(root: Path, n_ioi: int, n_sva: int, n_pool: int = 50, task: str = "all",
                          until: Optional[str] = None, split: Optional[str] = None) -> None:
    """Measure (see :mod:`_real_model_runs`): checkpointed chunks under ``docs/_static/results/smollm2/parts``."""
    torch.manual_seed(0)
    folder = root / "docs" / "_static" / "results" / "smollm2"
    folder.mkdir(parents=True, exist_ok=True)
    stop_at = None
    if until:
        now = datetime.datetime.now(datetime.timezone.utc)
        hour, minute = map(int, until.split(":"))
        stop_at = now.replace(hour=hour, minute=minute, second=0).timestamp()
    settings = {"n_ioi": n_ioi, "n_sva": n_sva, "n_pool": n_pool, "torch": torch.__version__,
                "machine": platform.machine()}
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    model, tokenizer = load_model(NAME, "cpu", "float32")
    for name, n_eval in (("ioi", n_ioi), ("sva", n_sva)):
        if task in ("all", name):
            measure(model, tokenizer, folder, name, n_eval, n_pool, stop_at, split)
            pool = load_split(model, folder, name, "pool")
            if pool is not None and pool["metric"].shape[0] >= CALIBRATION_PAIRS:
                fill_candidates(model, tokenizer, folder, name, chosen_names(model, pool), n_eval, n_pool)
    if task in ("all", "circuits"):
        for sub, circuit in CIRCUITS.items():
            if not (folder / sub / "report.md").exists():  # each run is its own checkpoint
                _measure_circuits(model, tokenizer, folder / sub, circuit)


def _measure_circuits(model, tokenizer, out: Path, circuit: Dict) -> None:
    began = time.time()
    with warnings.catch_warnings(record=True):
        result = run_circuit_experiment(model, tokenizer, methods=("RelP", "AtP", "IG"), name=NAME,
                                        show_progress=False, report=print, **circuit)
    result.save(out)
    command = ("OMP_NUM_THREADS=1 python scripts/make_results.py --real-model --task circuits "
               f"(RelP, AtP, IG; {circuit['task'].upper()} {circuit['nodes']}, --n-train {circuit['n_train']} "
               f"--n-test {circuit['n_test']}; {time.time() - began:.0f} s in all)")
    report = circuit_report(result, f"Made by `{command}`.",
                            f"_static/results/smollm2/{out.name}/circuit_faithfulness.png")
    (out / "report.md").write_text("\n".join(report) + "\n")


def _circuit_lines(folder: Path) -> List[str]:
    lines = ["## Circuit faithfulness (node circuits)", ""]
    for sub, circuit in CIRCUITS.items():
        per = "per structure" if circuit["task"] == "sva" else ""
        what = (f"{circuit['task'].upper()} {circuit['nodes']} circuits: nodes (every MLP neuron at every position) "
                f"scored on {circuit['n_train']} training pairs {per} by RelP, AtP and IG (10 steps), circuits of "
                f"the top nodes evaluated on {circuit['n_test']} test pairs {per} with the other nodes mean-ablated.")
        report = folder / sub / "report.md"
        lines += [f"### {circuit['task'].upper()} {circuit['nodes']}", ""]
        if not report.exists():
            lines += [f"Not measured in this run. {what} `python scripts/make_results.py --real-model --task "
                      "circuits` measures it and this page shows it after `--render-only`.", ""]
            continue
        saved = json.loads((folder / sub / "circuit_results.json").read_text())
        result = CircuitExperimentResult.load(folder / sub)  # the figure is redrawn from the saved run
        plot_faithfulness(result.curves, folder / sub / "circuit_faithfulness.png", title=result.title())
        lines += [what + " N is small (IG costs 10 passes per batch); the denominators below say which "
                  "settings carry a measurable effect.", "", _circuit_reading(saved, circuit["task"]), "",
                  report.read_text()]
    return lines


def _circuit_reading(saved: Dict, task: str) -> str:
    """Which settings carry an effect, and who leads there at 10, 100 and 1000 nodes (from the saved run)."""
    reliable = [s for s, d in saved["denominators"].items() if d["reliable"]]
    noisy = [s for s in saved["denominators"] if s not in reliable]
    text = (f"Reading: {METRIC_NOTES[task]}; m(M) is at most "
            f"{max(abs(d['m_full']) for d in saved['denominators'].values()):.3f} on the test pairs. ")
    if noisy:
        text += f"In {', '.join(noisy)} m(M) - m(empty) is under three standard errors: read those rows as noise. "
    for setting in reliable:
        curves = saved["curves"][setting]
        sizes = []
        for size in (10, 100, 1000):
            values = {m: c["faithfulness"][c["n_nodes"].index(size)] for m, c in curves.items()}
            order = sorted(values, key=values.get, reverse=True)
            sizes.append(f"at {size} nodes " + ", ".join(f"{m} {values[m]:.2f}" for m in order))
        text += (f"In {setting} (m(M) - m(empty) = {saved['denominators'][setting]['denominator']:.4g}) the "
                 "faithfulness is, " + "; ".join(sizes) + ". ")
    return text.strip()


def _how_lines(results: Dict, settings: Dict, command: str) -> List[str]:
    """How the page was measured: command, positions, N and what it cost."""
    done = {t: r for t, r in results.items() if r is not None}
    per_prompt = {t: r["seconds"]["AP"] / r["n"] for t, r in done.items()}
    short = [f"{t.upper()} N = {r['n']} of {settings['n_' + t]} asked" for t, r in done.items()
             if r["n"] < settings["n_" + t]]
    return ["## How it was measured", "",
            f"Command: `{command}` (one process per task, checkpointed in chunks of 10 pairs; then "
            "`python scripts/make_results.py --real-model --render-only` draws this page), after "
            f"`python scripts/fetch_smollm2.py`; torch {settings['torch']}, {settings['machine']} CPU, one thread "
            "per process, on 2 cores shared with other jobs (so wall times are pessimistic; the ratios within a "
            "table were measured in the same process). The numbers are in "
            "`docs/_static/results/smollm2/results.json`; the per-chunk scores in `parts/`.", "",
            "Components: the residual stream entering each of the 30 blocks, each attention output and "
            "each MLP output (90), each scored as one number per position (summed over the hidden "
            "dimension), as in the paper's Table 5. The metric is the logit difference for IOI and the "
            "probability difference of the right over the wrong verb for SVA.", "",
            "**Positions.** Activation patching (AP) is the expensive reference: 90 patched forwards per position "
            "and prompt (" + ", ".join(f"{per_prompt[t]:.0f} s per {t.upper()} prompt" for t in per_prompt)
            + " of wall time in this run, on a core shared with about five other jobs). So the methods are compared at the positions that carry the task: the roles S1 "
            "(first subject), IO (indirect object), S2 (second subject) and END (last token) for IOI; the five "
            "tokens after `The` for SVA. "
            + ("**N is short of the target:** " + "; ".join(short) + " (the run stopped at its time limit; "
               "rerunning the same command resumes). " if short else "")
            + "The bootstrap intervals are percentile intervals over 1000 resamples of the prompts.", "",
            "AP here is exact activation patching computed with the clean prompt's key/value cache: checked in the "
            "same run against `LayerActivationPatching` on the first prompt (3 components, max |difference| "
            + ", ".join(f"{r['check_max_abs_diff']:.1e} for {t.upper()}" for t, r in done.items())
            + ", float32)"
            + "".join(f"; the layered AP used for the tables (blocks below each patched layer run once) against the "
                      f"copy-per-component one on the first {t.upper()} prompt: max |difference| "
                      f"{r['layered_check']['max_abs_diff']:.1e} (largest effect {r['layered_check']['max_abs_effect']:.2g}), "
                      f"{r['layered_check']['seconds_plain']:.1f} s vs {r['layered_check']['seconds_layered']:.1f} s"
                      for t, r in done.items() if r.get("layered_check"))
            + ". Edge scores (CPR/CMD) on this model are on the edges results page.", ""]


def _task_result(model, tokenizer, folder: Path, task: str, settings: Dict, resamples: int = 1000) -> Optional[Dict]:
    """PCC tables, maps, wall times and the calibrated rules of one task from its finished chunks."""
    evaluated, pool = load_split(model, folder, task, "eval"), load_split(model, folder, task, "pool")
    if evaluated is None:
        return None
    if pool is not None and pool["metric"].shape[0] >= CALIBRATION_PAIRS:
        # score the chosen candidates (only those) on the evaluated pairs, once; cached in parts/
        fill_candidates(model, tokenizer, folder, task, chosen_names(model, pool), settings[f"n_{task}"],
                        settings["n_pool"])
        evaluated = load_split(model, folder, task, "eval")
    scores = {m: evaluated["scores"][m] for m in ["AP", *METHODS]}
    cal = calibrated(model, pool, evaluated) if pool is not None else None
    if cal is not None:
        scores[CALIBRATED] = cal.pop("scores")
    layers = scores["AP"].shape[1] // len(KINDS)
    check = json.loads((folder / "parts" / f"{task}_check.json").read_text())
    layered = folder / "parts" / f"{task}_layered_check.json"
    metric = evaluated["metric"]
    return {"n": int(metric.shape[0]), "metric_mean": float(metric.mean()), "solved": float((metric > 0).mean()),
            "pcc": pcc_tables(scores, layers, resamples),
            "seconds": {m: evaluated["seconds"][m] for m in ["AP", *METHODS]},
            "candidate_seconds": sum(v for k, v in evaluated["seconds"].items() if k.startswith("cand:")),
            "check_max_abs_diff": check["max_abs_diff"], "check_seconds": check["seconds"],
            "layered_check": json.loads(layered.read_text()) if layered.exists() else None,
            "n_pool": 0 if pool is None else int(pool["metric"].shape[0]), "calibration": cal,
            "mean_maps": {m: {kind: v[:, k * layers:(k + 1) * layers].mean(0) for k, kind in enumerate(KINDS)}
                          for m, v in scores.items()}}


def _calibration_lines(task: str, result: Dict) -> List[str]:
    cal = result["calibration"]
    if cal is None:
        return [f"Calibrated rules ({task}): not measured (the calibration pool has {result['n_pool']} of the "
                f"{CALIBRATION_PAIRS} pairs needed).", ""]
    gradient = cal[GRADIENT]
    same = gradient["choices"] == cal["choices"]
    lines = [f"**{CALIBRATED}**: rules chosen per component type by `choose_rules` (the selection step of "
             f"`calibrate_rules`, with the library's default, `default=\"best-preset\"`: the best of the presets "
             f"`gradient`, `relp` and `relp-ah` on the calibration pairs is kept unless a candidate beats it beyond "
             f"the noise) on the first {CALIBRATION_PAIRS} pairs of a calibration pool "
             f"(seed 1) disjoint from the {result['n']} evaluated pairs (seed 0), with AP read at the same "
             "positions as above. Chosen: " + ", ".join(f"{k} `{v}`" for k, v in cal["choices"].items())
             + f"; choosing cost {cal['calibration_seconds']:.0f} s of wall time ({CALIBRATION_PAIRS} pairs: AP and "
             f"{cal['n_candidates']} candidate passes)." + (" Warnings: " + " ".join(cal["warnings"])
                                                           if cal["warnings"] else ""), "",
             "```text", cal["summary"].strip(), "```", "",
             "With `default=\"gradient\"` (AtP kept unless a candidate beats it beyond the noise) the same pairs "
             + ("choose the same rules." if same else "choose " + ", ".join(
                 f"{k} `{v}`" for k, v in gradient["choices"].items()) + "; their held-out agreements are in "
                "{doc}`results_calibration_detail`.")
             + (" Warnings: " + " ".join(gradient["warnings"]) if gradient["warnings"] and not same else ""), ""]
    return lines


def _calibration_fragment(root: Path, studies: List[Dict], command: str) -> None:
    """``docs/results_calibration_smollm2.md``: the SmolLM2 rows in the layout of results_calibration.md."""
    lines = ["### SmolLM2-135M (real model)", ""]
    if not studies:
        lines += ["Not measured in this run: the calibration pools have fewer than "
                  f"{CALIBRATION_PAIRS} pairs (see {{doc}}`results_smollm2`).", ""]
    lines += [f"Measured with `{command}` (then `--render-only`); details and the Table-5 numbers on "
              "{doc}`results_smollm2`. Same method as the rows above (rules chosen with the library's default, "
              "`best-preset`, and from the same scores with the gradient as default), with two differences forced "
              "by the cost of AP on this model: AP and the candidates are read at the task's positions only (IOI: "
              "S1, IO, S2, END; SVA: the five tokens after `The`), and the held-out pairs are the page's evaluated "
              "pairs. The per-pair scores of the calibration pool and of the evaluated pairs are shipped "
              "(`docs/_static/results/smollm2/parts/`). Brackets: 95% paired-bootstrap intervals over the held-out "
              "pairs.", ""]
    for default, title in ((LIBRARY_DEFAULT, "default: best preset"), (GRADIENT, "default: gradient")):
        for res in studies:
            lines += [f"Held-out Pearson with AP, {res['task']}, calibrated on {CALIBRATION_PAIRS} pairs "
                      f"(pool {res['n_pool']}, held out {res['n_eval']}), {title}:", "",
                      main_table([res], CALIBRATION_PAIRS, default), ""]
    for default, title in ((LIBRARY_DEFAULT, "default: best preset"), (GRADIENT, "default: gradient")):
        for res in studies:
            sizes = sorted({r["size"] for r in res["runs"]})
            lines += [f"Calibration size, {res['task']}, {title}: calibrated minus AtP, then minus the best preset, "
                      f"on the {res['n_eval']} held-out pairs (mean and worst over {DRAWS} subsets per size, one "
                      "for the whole pool)"
                      + ("" if sizes == [10, 20, 50, 100] else "; n = " + ", ".join(
                          str(n) for n in (10, 20, 50, 100) if n not in sizes) + f" not measured: the pool has "
                         f"{res['n_pool']} pairs (AP on more pairs did not fit this run's CPU budget)") + ":", "",
                      size_table([res], sizes, default), ""]
    (root / "docs" / "results_calibration_smollm2.md").write_text("\n".join(lines) + "\n")


def render_real_model_page(root: Path) -> None:
    """Heatmaps, ``results.json``, ``docs/results_smollm2.md`` and the calibration rows from the saved chunks."""
    folder = root / "docs" / "_static" / "results" / "smollm2"
    settings = json.loads((folder / "settings.json").read_text())
    model, tokenizer = load_model(NAME, "cpu", "float32")
    card = sized_card(model)
    results = {task: _task_result(model, tokenizer, folder, task, settings) for task in ("ioi", "sva")}
    command = (f"OMP_NUM_THREADS=1 python scripts/make_results.py --real-model --task ioi|sva|circuits "
               f"--n-ioi {settings['n_ioi']} --n-sva {settings['n_sva']} --n-pool {settings['n_pool']}")
    studies = []
    for task, result in results.items():
        if result is not None and result["calibration"] is not None:
            result["calibration"]["study"]["task"] = task.upper()
            studies.append(result["calibration"]["study"])
    _calibration_fragment(root, studies, command)
    record = {"command": command, "model_card": card, **settings,
              **{t: None if r is None else {k: v for k, v in r.items() if k != "mean_maps"}
                 for t, r in results.items()}}
    for r in record.values():
        if isinstance(r, dict) and r.get("calibration"):
            r["calibration"] = {**r["calibration"], "study": study_rows([r["calibration"]["study"]])[0]}
    (folder / "results.json").write_text(json.dumps(record, indent=2, default=float))
    lines = ["# Results on a real model: SmolLM2-135M", "",
             "Every other number in these docs comes from the two tiny embedded models. This page measures "
             "a real pretrained model the same way, on this machine's CPU.", "", "## Model card", ""]
    lines += _card_lines(card)
    lines += _how_lines(results, settings, command)
    for task, title, labels, note in (
            ("ioi", "IOI (Table 5 layout)", IOI_ROLES, "Templates: the package's three IOI templates, seed 0."),
            ("sva", "Subject-verb agreement (same layout)", SVA_LABELS,
             f"Structure `{SVA_STRUCTURE}` (`The officer that the editors help` -> is / are), seed 0. The metric is "
             "a probability difference, and this small model barely prefers the right verb, so the effects are "
             "small (a few hundredths) and the correlations lower than for IOI.")):
        lines += [f"## {title}", ""]
        if results[task] is None:
            lines += ["Not measured in this run.", ""]
            continue
        lines += _section(task.upper(), results[task], labels, folder, note)
        lines += _calibration_lines(task.upper(), results[task])
    lines += _circuit_lines(folder)
    (root / "docs" / "results_smollm2.md").write_text("\n".join(lines) + "\n")
