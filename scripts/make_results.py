"""Measure the numbers of the docs' results page on the embedded models.

Runs the IOI experiment (AP vs AtP vs RelP, with and without the AH-rule) on both
embedded models and the SVA circuit experiment (RelP vs AtP vs IG; feature and
neuron circuits) on the default one, then writes ``docs/_static/results/``
(JSON, CSV, PNG) and ``docs/results_measured.md``, which ``docs/results.md`` includes.

    OMP_NUM_THREADS=1 python scripts/make_results.py            # about 10-15 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from captum_relp.embedded import EMBEDDED_MODELS, load_embedded, load_embedded_saes, load_training_info
from captum_relp.experiments import run_circuit_experiment, run_ioi_experiment
from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import COMPONENT_TITLES as KIND_TITLES

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "results"


def ioi_section(name: str, n_prompts: int) -> str:
    model, tokenizer = load_embedded(name)
    info = load_training_info(name)
    result = run_ioi_experiment(model, tokenizer, n_prompts=n_prompts, rules=("relp", "relp-ah"),
                                names=info["heldout_names"], show_progress=False)
    folder = OUT / f"ioi-{name}"
    result.save(folder)
    methods = [m for m in result.scores if m != "AP"]
    lines = [f"### {name}", "",
             f"{n_prompts} IOI prompt pairs with held-out names, `captum-relp ioi --model {name} "
             f"--rules relp,relp-ah --n-prompts {n_prompts}`.", ""]
    for title, table in (("per-prompt maps", result.pcc_per_prompt), ("prompt-averaged maps", result.pcc_mean_map)):
        lines += [f"PCC with activation patching, {title}:", "",
                  "| component | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for kind in KINDS:
            lines.append(f"| {KIND_TITLES[kind]} | " + " | ".join(f"{table[kind][m]:.3f}" for m in methods) + " |")
        lines.append("")
    ratios = result.time_ratios()
    lines += ["Wall time in the same run (ratio to AtP): " + ", ".join(
        f"{m} {result.seconds[m]:.2f} s ({ratios[m]:.2f}x)" for m in result.seconds), ""]
    for kind in KINDS:
        lines += [f"![{KIND_TITLES[kind]}](_static/results/ioi-{name}/ioi_heatmap_{kind}.png)", ""]
    return "\n".join(lines)


def circuit_section(name: str, nodes: str, n_train: int, n_test: int) -> str:
    model, tokenizer = load_embedded(name)
    info = load_training_info(name)
    saes = load_embedded_saes(name) if nodes == "features" else None
    result = run_circuit_experiment(model, tokenizer, "sva", nodes=nodes, saes=saes, n_train=n_train,
                                    n_test=n_test, heldout=info["heldout_nouns"], show_progress=False)
    folder = OUT / f"circuit-{name}-{nodes}"
    result.save(folder)
    lines = [f"### SVA {nodes} circuits, {name}", "",
             f"`captum-relp circuit --task sva --nodes {nodes} --n-train {n_train} --n-test {n_test}`"
             f"{' --model ' + name if name != EMBEDDED_MODELS[0] else ''}", "", "```text", result.summary(), "```", "",
             f"![faithfulness](_static/results/circuit-{name}-{nodes}/circuit_faithfulness.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    began = time.time()
    sections = ["## Measured on the embedded models", "",
                f"Measured with `python scripts/make_results.py` (torch {torch.__version__}, "
                f"{platform.machine()} CPU). Names and nouns in the test prompts never occur in the "
                "IOI / SVA sentences the models were trained on.", "", "## IOI faithfulness (Table 5 layout)", ""]
    for name in EMBEDDED_MODELS:
        sections.append(ioi_section(name, args.n_prompts))
    sections += ["## Circuit discovery (Figure 3 layout)", ""]
    for nodes in ("features", "neurons"):
        sections.append(circuit_section(EMBEDDED_MODELS[0], nodes, args.n_train, args.n_test))
    sections.append(f"Total time of this script: {time.time() - began:.0f} s.")
    (ROOT / "docs" / "results_measured.md").write_text("\n".join(sections) + "\n")
    (OUT / "settings.json").write_text(json.dumps(vars(args)))


if __name__ == "__main__":
    main()
