"""The page "Calibrated rules on real models", written from the folders the runs saved.

Each run is one command of the package (``captum-relp ioi`` or ``captum-relp attribute``) with
``--rules relp,relp-ah,calibrated``: the rules are calibrated on separate pairs and every method
is compared with exact activation patching on the evaluated pairs. The command's output folder
(results JSON, per-prompt scores, calibration file, run record) is copied into
``docs/_static/results/calibration-real/<run>``; this script reads only those files, recomputes
every correlation and interval from the saved per-prompt scores, and writes the page:

    PYTHONPATH=. python scripts/calibration_real_page.py --out docs/results_calibration_real.md

``tests/scripts/test_calibration_real_page.py`` checks that the committed page is what this
script writes, and that the recomputed correlations equal the ones the runs printed and saved.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from captum_relp.experiments.agreement import agreement_table

ROOT = Path(__file__).resolve().parents[1] / "docs" / "_static" / "results" / "calibration-real"
KINDS = {"resid": "Residual stream", "attn": "Attention outputs", "mlp": "MLP outputs"}
METHODS = ("AtP", "RelP", "RelP+AH", "RelP (calibrated)")
PRESETS = ("AtP", "RelP", "RelP+AH")
RUNS = {
    "smollm2-135m-ioi": ("SmolLM2-135M", "IOI", "captum-relp ioi --model smollm2-135m --n-prompts 16 "
                         "--rules relp,relp-ah,calibrated --calibration-prompts 16 --batch-size 8 --threads 1"),
    "gemma3-270m-ioi": ("Gemma-3 270M", "IOI", "captum-relp ioi --model gemma3-270m --n-prompts 16 "
                        "--rules relp,relp-ah,calibrated --calibration-prompts 16 --batch-size 8 --threads 1"),
    "smollm2-135m-greater-than": ("SmolLM2-135M", "greater-than (the shipped example file)",
                                  "captum-relp attribute --task captum_relp/tasks/data/greater_than.csv "
                                  "--model smollm2-135m --n-prompts 16 --rules relp,relp-ah,calibrated "
                                  "--calibration-prompts 16 --no-linearity --threads 1"),
}
GRADIENT = "-gradient-default"
"""Suffix of a run folder calibrated with ``--calibration-default gradient`` (the same pairs otherwise)."""
RUNS.update({name + GRADIENT: (model, task, command + " --calibration-default gradient")
             for name, (model, task, command) in list(RUNS.items())})
"""Run folder -> (model, task, the command that wrote it)."""
DEFAULT_TEXT = {
    "best-preset": "Per component type, the fixed preset (gradient, RelP or RelP+AH) that agrees best with "
                   "activation patching on the calibration pairs is kept unless another candidate beats it beyond "
                   "the noise of those pairs.",
    "gradient": "The gradient (AtP) is kept unless a candidate beats it beyond the noise of the calibration pairs.",
}
"""What each ``default`` of :func:`~captum_relp.calibrate_rules` keeps, in words."""


def load_run(folder: Path) -> Dict[str, object]:
    """The saved results, per-prompt scores and calibration of one run folder."""
    kind = "ioi" if (folder / "ioi_results.json").exists() else "task"
    results = json.loads((folder / f"{kind}_results.json").read_text())
    scores = np.load(folder / f"{kind}_scores.npz")
    calibration = json.loads((folder / f"{kind}_calibration.json").read_text())
    record = json.loads((folder / "captum-relp-run.json").read_text())
    return {"kind": kind, "results": results, "scores": {k: scores[k] for k in scores.files},
            "calibration": calibration, "record": record}


def agreement(run: Dict[str, object]) -> Dict[str, Dict[str, dict]]:
    """Per component type: every method's PCC with AP and interval, recomputed from the saved scores,
    with the paired difference of calibrated RelP to the best preset (``best`` names it)."""
    scores, out = run["scores"], {}
    valid = scores["valid"].astype(bool)
    for kind in KINDS:
        reference = scores[f"AP/{kind}"]
        rows = reference.shape[0]
        table = agreement_table(reference, {m: scores[f"{m}/{kind}"][:rows] for m in METHODS}, valid[:rows])
        best = max(PRESETS, key=lambda m: table[m]["pcc"])
        paired = agreement_table(reference, {m: scores[f"{m}/{kind}"][:rows] for m in (best, METHODS[-1])},
                                 valid[:rows], against=best)
        table["best"] = {"method": best, **{k: paired[METHODS[-1]][k] for k in ("margin", "margin_interval")}}
        out[kind] = table
    return out


def _cell(row: dict) -> str:
    low, high = row["interval"]
    return f"{row['pcc']:.3f} [{low:.2f}, {high:.2f}]"


def _verdict(best: dict) -> str:
    low, high = best["margin_interval"]
    if best["margin"] == 0 and low == 0 and high == 0:
        return f"0: the same scores as {best['method']}"
    spec = "+.1e" if any(0 < abs(x) < 0.0005 for x in (best["margin"], low, high)) else "+.3f"  # never "+0.000"
    margin = f"{best['margin']:{spec}} [{low:{spec}}, {high:{spec}}]"
    if high < 0:
        return f"{margin}: below {best['method']} beyond the noise"
    if low > 0:
        return f"{margin}: above {best['method']} beyond the noise"
    return f"{margin}: within the noise of {best['method']}"


def run_section(name: str, run: Dict[str, object]) -> List[str]:
    """The table of one run."""
    model, task, command = RUNS[name]
    table = agreement(run)
    n = int(run["scores"]["AP/mlp"].shape[0])
    cal = run["calibration"]
    lines = [f"### {model}, {task}" + (", gradient as calibration default" if name.endswith(GRADIENT) else ""), "",
             f"N = {n} evaluated pairs; rules calibrated on {cal['n_examples']} separate pairs. "
             "PCC with activation patching over every (pair, layer, position); brackets: 95% bootstrap "
             "intervals over the evaluated pairs. The last column is calibrated RelP minus the best "
             "preset on these pairs, with its paired interval.", "",
             "| component | AtP | RelP | RelP+AH | calibrated | chosen rules | calibrated − best preset |",
             "|---|---:|---:|---:|---:|---|---|"]
    for kind, title in KINDS.items():
        row = table[kind]
        decision = cal["selection"][kind]["decision"]
        lines.append(f"| {title} | " + " | ".join(_cell(row[m]) for m in METHODS)
                     + f" | `{cal['choices'][kind]}` ({decision}) | {_verdict(row['best'])} |")
    info = cal.get("info", {})
    cost = info.get("cost", "")
    lines += [""] + ([f"Calibration cost: {cost}.", ""] if cost else [])
    lines += [f"Command (captum-relp {run['record']['version']}):", "", "```bash", command, "```", ""]
    return lines


def render(root: Path = ROOT) -> str:
    """The page, from every run folder under ``root`` that :data:`RUNS` names."""
    found = [name for name in RUNS if (root / name).is_dir()]
    lines = ["# Calibrated rules on real models", "",
             "Does calibration find rules at least as good as every fixed choice on a real model? Each "
             "run below calibrates the rules per component type on separate pairs "
             "(`--rules relp,relp-ah,calibrated`, see {doc}`calibration`) and compares AtP, the two RelP "
             "presets and calibrated RelP with exact activation patching on the evaluated pairs. Every "
             "number is recomputed from the per-prompt scores the run saved "
             "(`docs/_static/results/calibration-real/<run>/`), by "
             "`PYTHONPATH=. python scripts/calibration_real_page.py --out docs/results_calibration_real.md`.",
             "", "## Summary", "",
             "| model, task | component | best preset | calibrated − best preset | same, gradient as default |",
             "|---|---|---|---|---|"]
    variants = {name: load_run(root / name) for name in found if name.endswith(GRADIENT)}
    runs = {name: load_run(root / name) for name in found if not name.endswith(GRADIENT)}
    below, above, below_atp = [], 0, 0
    for name, run in runs.items():
        model, task, _ = RUNS[name]
        for kind, title in KINDS.items():
            table = agreement(run)[kind]
            best = table["best"]
            below_atp += table[METHODS[-1]]["margin_interval"][1] < 0
            variant = variants.get(name + GRADIENT)
            other = _verdict(agreement(variant)[kind]["best"]) if variant is not None else "not measured"
            lines.append(f"| {model}, {task.split(' (')[0]} | {title} | {best['method']} | {_verdict(best)} "
                         f"| {other} |")
            if best["margin_interval"][1] < 0:
                agreements = run["calibration"]["agreement"][kind]
                preset = max(("gradient", "relp", "relp-ah"), key=lambda n: agreements[n])
                below.append(f"{model} {task.split(' (')[0]} {title.lower()} (`{run['calibration']['choices'][kind]}`, "
                             f"{run['calibration']['selection'][kind]['decision']}; the best preset on the calibration "
                             f"pairs was `{preset}`, " + ", ".join(f"`{n}` {agreements[n]:.3f}" for n in
                                                                  ("gradient", "relp", "relp-ah")) + ")")
            above += best["margin_interval"][0] > 0
    count = 3 * len(runs)
    lines += ["", f"Calibrated RelP is above the best preset beyond the noise in {above} of {count} rows and below "
              f"it beyond the noise in {len(below)} of {count}" + (f": {'; '.join(below)}." if below else ".")
              + f" It is below AtP beyond the noise in {below_atp} of {count} rows."]
    defaults = sorted({str(run["calibration"].get("default")) for run in runs.values()})
    lines += ["", "Calibration default in these runs: " + ", ".join(f"`{d}`" for d in defaults) + ". "
              + " ".join(DEFAULT_TEXT.get(d, "") for d in defaults).strip()]
    if below:
        lines += ["", "Where it is below, the calibration pairs kept the default (or chose a candidate) that the "
                  "evaluated pairs rank lower: the ranking of close rule sets differs between two samples of 16 "
                  "pairs. More calibration pairs narrow it (see {doc}`calibration`)."]
    lines += ["", "Measured on a shared 2-core x86_64 CPU, torch 2.13.0+cpu, one thread, with the fetched "
              "models (see {doc}`results_smollm2`). Wall times depend on what else ran on the machine at the time "
              "(the gradient-default runs shared it with more jobs): compare times within a run, not across runs.",
              "", "## Runs", ""]
    for name, run in {**runs, **variants}.items():
        lines += run_section(name, run)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write the page of calibrated rules on real models.")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.write_text(render(args.root))


if __name__ == "__main__":
    main()
