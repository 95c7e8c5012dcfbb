"""Measure the numbers of the docs' results page on the embedded models.

Runs the IOI experiment (AP vs AtP vs RelP, with and without the AH-rule) on both
embedded models and the SVA circuit experiment (RelP vs AtP vs IG; feature and
neuron circuits) on the default one, then writes ``docs/_static/results/``
(JSON, CSV, PNG) and ``docs/results_measured.md``, which ``docs/results.md`` includes:
tables, figures that open full size, and two sentences of reading per figure,
computed from the numbers of this run.

    OMP_NUM_THREADS=1 python scripts/make_results.py            # about 5-10 minutes on 2 idle cores
    OMP_NUM_THREADS=1 python scripts/make_results.py --ioi-only # the IOI part only (seconds)

``--ioi-only`` rewrites the ``ioi-*`` folders and the IOI part of ``docs/results_measured.md``
and keeps the circuit results and the rest of the page as they are.

``--real-model`` measures SmolLM2-135M instead (fetch it first: ``python
scripts/fetch_smollm2.py``) and writes ``docs/results_smollm2.md``,
``docs/results_calibration_smollm2.md`` and ``docs/_static/results/smollm2/``. Run it as
separate, checkpointed processes (``--task ioi``, ``--task sva``, ``--task circuits``;
``--until HH:MM`` stops starting new chunks; a rerun resumes), then ``--render-only``:

    OMP_NUM_THREADS=1 python scripts/make_results.py --real-model --n-ioi 100 --n-sva 100 --n-pool 50 --task ioi
    OMP_NUM_THREADS=1 python scripts/make_results.py --real-model --n-ioi 100 --n-sva 100 --n-pool 50 --task sva
    OMP_NUM_THREADS=1 python scripts/make_results.py --real-model --n-ioi 100 --n-sva 100 --n-pool 50 --task circuits
    OMP_NUM_THREADS=1 python scripts/make_results.py --real-model --render-only

Measured cost per pair, one thread, process CPU seconds on an x86_64 core: activation
patching (layered, 90 components) about 10 s per IOI pair at its four roles (16 s without
the layering) and 6 s per SVA pair at five positions (9 s); AtP, RelP and RelP+AH about
0.3-0.6 s each; each of the 13 further calibration candidates about the same as RelP
(pool pairs only; on the evaluated pairs only the chosen candidates run). So
``--n-ioi 100 --n-sva 100 --n-pool 50`` is roughly 35 CPU-minutes for IOI and 20 for SVA;
on a shared machine divide by the share of a core the process gets.

The defaults (40 IOI prompts, 40/40 SVA pairs per structure) are smaller than the
paper's 100 so that the page can be regenerated on a laptop; pass
``--n-prompts 100 --n-train 100 --n-test 50`` for the earlier sizes.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from captum_relp.embedded import EMBEDDED_MODELS, load_embedded, load_embedded_saes, load_training_info
from captum_relp.experiments import run_circuit_experiment, run_ioi_experiment
from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import COMPONENT_TITLES as KIND_TITLES

from _report import circuit_report, figure, table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "results"
TIE = 0.01
"""Correlations closer than this to the best one are reported as a tie, not a win."""


def heatmap_reading(result, kind: str) -> str:
    maps = result.mean_maps()
    labels = result.position_labels
    ap = maps["AP"][kind]
    layer, role = np.unravel_index(np.abs(ap).argmax(), ap.shape)
    others = [m for m in maps if m != "AP"]
    spots = []
    for m in others:
        l2, r2 = np.unravel_index(np.abs(maps[m][kind]).argmax(), ap.shape)
        spots.append(f"{m}{' peaks' if not spots else ''} at {labels[r2]}, layer {l2}")
    return (f"Activation patching finds the largest effect at {labels[role]}, layer {layer} "
            f"({ap[layer, role]:+.2f} logit difference); " + "; ".join(spots) + ". "
            + agreement_reading({m: result.pcc_mean_map[kind][m] for m in others}))


def join(names: list) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def agreement_reading(pcc: dict, tie: float = TIE) -> str:
    """Which method's map agrees best with AP's; methods within ``tie`` of the best are a tie, not a win.

    >>> agreement_reading({"AtP": 0.951, "RelP": 0.954, "RelP+AH": 0.955})
    'Over the whole map AtP, RelP and RelP+AH agree with AP equally well (r = 0.95, 0.95 and 0.95: within 0.01, a tie).'
    >>> agreement_reading({"AtP": 0.90, "RelP": 0.996, "RelP+AH": 0.999})
    'Over the whole map RelP and RelP+AH agree with AP equally well (r = 1.00 and 1.00: within 0.01, a tie); AtP less (r = 0.90).'
    >>> agreement_reading({"AtP": 0.80, "RelP": 0.95})
    'Over the whole map RelP agrees best with AP (r = 0.95); AtP less (r = 0.80).'
    """
    top = max(pcc.values())
    tied = [m for m, r in pcc.items() if top - r <= tie]
    rest = [m for m in pcc if m not in tied]
    values = join([f"{pcc[m]:.2f}" for m in tied])
    if len(tied) == 1:
        text = f"Over the whole map {tied[0]} agrees best with AP (r = {values})"
    else:
        text = (f"Over the whole map {join(tied)} agree with AP equally well "
                f"(r = {values}: within {tie:g}, a tie)")
    if rest:
        text += "; " + join(rest) + " less (r = " + join([f"{pcc[m]:.2f}" for m in rest]) + ")"
    return text + "."


REAL_MODELS = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}
"""Fetched real models with a results folder under ``docs/_static/results`` (``results.json``)."""


TABLE_METHODS = ("RelP", "RelP+AH", "AtP")
"""The methods of the models table, in its cell order."""


def _row(name: str, architecture: str, layers: int, n_params: float, n: int, pcc: dict, page: str) -> list:
    return ([f"`{name}`", architecture, layers, f"{n_params / 1e6:.2f} M", n]
            + [" / ".join(f"{pcc[k][m]:.3f}" for m in TABLE_METHODS) for k in KINDS] + [page])


def models_table(root: Path) -> list:
    """The models table: one row per model with saved IOI results, read from the saved JSON only.

    Embedded models from ``ioi-<name>/ioi_results.json`` (their configs are shipped), fetched
    real models from ``<folder>/results.json`` (point estimates of the per-prompt PCCs).
    """
    rows = []
    for name in EMBEDDED_MODELS:
        saved = root / "docs" / "_static" / "results" / f"ioi-{name}" / "ioi_results.json"
        if saved.exists():
            record = json.loads(saved.read_text())
            model, _ = load_embedded(name)
            n_params = sum(p.numel() for p in model.parameters())
            rows.append(_row(name, model.config.model_type, model.config.num_hidden_layers, n_params,
                             record["config"]["n_prompts"], record["pcc_per_prompt"], "below"))
    for name, folder in REAL_MODELS.items():
        saved = root / "docs" / "_static" / "results" / folder / "results.json"
        if saved.exists():
            record = json.loads(saved.read_text())
            card, ioi = record["model_card"], record["ioi"]
            pcc = {k: {m: v[0] for m, v in ioi["pcc"]["per_prompt"][k].items()} for k in KINDS}
            rows.append(_row(name, card["architecture"], card["layers"], card["parameters"], ioi["n"], pcc,
                             f"{{doc}}`results_{folder}`"))
    lines = ["## Models run", "",
             "Every model these pages measured, with the IOI correlation with activation patching "
             "(per-prompt maps, N prompt pairs, RelP / RelP+AH / AtP; the model's page has the rest).", ""]
    return lines + table(["model", "architecture", "layers", "parameters", "N"]
                         + [f"{KIND_TITLES[k]}" for k in KINDS] + ["details"], rows)


def write_models_table(root: Path) -> None:
    """Write ``docs/results_models.md`` (included by ``docs/results.md``)."""
    (root / "docs" / "results_models.md").write_text("\n".join(models_table(root)))


def ioi_section(name: str, n_prompts: int) -> str:
    model, tokenizer = load_embedded(name)
    info = load_training_info(name)
    result = run_ioi_experiment(model, tokenizer, n_prompts=n_prompts, rules=("relp", "relp-ah"),
                                names=info["heldout_names"], show_progress=False)
    folder = OUT / f"ioi-{name}"
    result.save(folder)
    methods = [m for m in result.scores if m != "AP"]
    counts = result.layout.counts()
    short = [label for label, n in zip(result.position_labels, counts) if n < n_prompts]
    lines = [f"### {name}", "",
             f"{n_prompts} IOI prompt pairs with held-out names (`captum-relp ioi --model {name} "
             f"--rules relp,relp-ah --n-prompts {n_prompts}`). The three templates differ in length, so the "
             "prompt-averaged maps align tokens by role (S1 first subject, IO indirect object, S2 second "
             "subject, END last token) and average each role over the prompts that have it"
             + (f" (roles {', '.join('`' + s + '`' for s in short)} occur in some templates only)" if short else "") + ".", ""]
    for title, pcc in (("per-prompt maps", result.pcc_per_prompt), ("prompt-averaged, role-aligned maps",
                                                                    result.pcc_mean_map)):
        lines += [f"PCC with activation patching, {title}"
                  + (" (every prompt's scores are in `ioi_scores.npz`; `ioi_results.json` adds the 95% "
                     "bootstrap interval over the prompts of each correlation)" if title == "per-prompt maps"
                     else "") + ":", ""]
        lines += table(["component"] + methods, [[KIND_TITLES[k]] + [f"{pcc[k][m]:.3f}" for m in methods]
                                                 for k in KINDS])
    ratios = result.time_ratios()
    lines += ["Wall time in the same run:", ""]
    lines += table(["method", "seconds", "ratio to AtP"],
                   [[m, f"{result.seconds[m]:.2f}", f"{ratios[m]:.2f}x"] for m in result.seconds])
    for kind in KINDS:
        path = f"_static/results/ioi-{name}/ioi_heatmap_{kind}.png"
        lines += figure(path, f"{KIND_TITLES[kind]} heatmaps, {name}",
                        f"{KIND_TITLES[kind]}, {name}. " + heatmap_reading(result, kind))
    return "\n".join(lines)


def circuit_section(name: str, nodes: str, n_train: int, n_test: int) -> str:
    model, tokenizer = load_embedded(name)
    info = load_training_info(name)
    saes = load_embedded_saes(name) if nodes == "features" else None
    with warnings.catch_warnings(record=True):
        result = run_circuit_experiment(model, tokenizer, "sva", nodes=nodes, saes=saes, n_train=n_train,
                                        n_test=n_test, heldout=info["heldout_nouns"], show_progress=False)
    folder = OUT / f"circuit-{name}-{nodes}"
    result.save(folder)
    command = (f"captum-relp circuit --task sva --nodes {nodes} --n-train {n_train} --n-test {n_test}"
               f"{' --model ' + name if name != EMBEDDED_MODELS[0] else ''}")
    return "\n".join([f"### SVA {nodes} circuits, {name}", ""] + circuit_report(
        result, f"`{command}`", f"_static/results/circuit-{name}-{nodes}/circuit_faithfulness.png"))


IOI_HEADING = "## IOI faithfulness (Table 5 layout)"
CIRCUIT_HEADING = "## Circuit discovery (Figure 3 layout)"


def replace_ioi_part(page: str, ioi_sections: list) -> str:
    """``page`` (``results_measured.md``) with its IOI part, up to the circuit part, made of ``ioi_sections``.

    >>> replace_ioi_part(f"intro\\n{IOI_HEADING}\\n\\nold\\n{CIRCUIT_HEADING}\\nkept\\n", ["new"])
    'intro\\n## IOI faithfulness (Table 5 layout)\\n\\nnew\\n## Circuit discovery (Figure 3 layout)\\nkept\\n'
    """
    if page.count(IOI_HEADING) != 1 or page.count(CIRCUIT_HEADING) != 1:
        raise ValueError(f"page: expected one {IOI_HEADING!r} and one {CIRCUIT_HEADING!r} heading")
    start, end = page.index(IOI_HEADING), page.index(CIRCUIT_HEADING)
    if end < start:
        raise ValueError(f"page: {CIRCUIT_HEADING!r} comes before {IOI_HEADING!r}")
    return page[:start] + "\n".join([IOI_HEADING, "", *ioi_sections]) + "\n" + page[end:]


OVERSHOOT = """Faithfulness is (m(C) - m(empty)) / (m(M) - m(empty)) and completeness the same ratio for
the complement of the circuit. Both can leave [0, 1]: a circuit can beat the full model
(some ablated nodes worked against the behaviour), and when the full model barely beats
the mean-ablated one the small denominator turns small differences into large ratios.
The tables give the denominator with its standard error over the test pairs; settings
where it is under three standard errors are flagged, warned about by
`captum-relp circuit`, and drawn with hollow markers.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=40)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--real-model", action="store_true",
                        help="measure SmolLM2-135M (docs/results_smollm2.md) instead of the embedded models")
    parser.add_argument("--n-ioi", type=int, default=12, help="IOI pairs for --real-model")
    parser.add_argument("--n-sva", type=int, default=10, help="SVA pairs for --real-model")
    parser.add_argument("--n-pool", type=int, default=50,
                        help="calibration pool pairs per task for --real-model (disjoint from the evaluated ones)")
    parser.add_argument("--task", choices=("all", "ioi", "sva", "circuits"), default="all",
                        help="with --real-model: measure one part only (parts are checkpointed; run the parts "
                             "as separate processes, then --render-only)")
    parser.add_argument("--split", choices=("eval", "pool"), default=None,
                        help="with --real-model --task ioi|sva: only the evaluated pairs or only the calibration "
                             "pool (two processes can share a task this way)")
    parser.add_argument("--until", default=None,
                        help="with --real-model: stop starting new chunks after this UTC time (HH:MM)")
    parser.add_argument("--ioi-only", action="store_true",
                        help="measure the IOI part only: rewrite the ioi-* folders and the IOI part of "
                             "docs/results_measured.md, keep the circuit results")
    parser.add_argument("--models-table", action="store_true",
                        help="only rewrite docs/results_models.md from the saved results (no model needed)")
    parser.add_argument("--render-only", action="store_true",
                        help="with --real-model: redraw the page from the saved results, no measuring")
    args = parser.parse_args()
    if args.ioi_only and (args.real_model or args.models_table):
        parser.error("--ioi-only measures the embedded models: it does not combine with --real-model or --models-table")
    if args.models_table:
        write_models_table(ROOT)
        return
    if args.real_model:
        from _real_model_page import render_real_model_page, write_real_model_page

        if not args.render_only:
            write_real_model_page(ROOT, args.n_ioi, args.n_sva, args.n_pool, args.task, args.until,
                                  args.split)
        if args.render_only or args.task == "all":
            render_real_model_page(ROOT)
            write_models_table(ROOT)
        return
    torch.manual_seed(0)
    if args.ioi_only:
        page = ROOT / "docs" / "results_measured.md"
        text = page.read_text()  # read before anything is removed: a page without its headings stops here
        replace_ioi_part(text, [])
        for folder in OUT.glob("ioi-*"):
            shutil.rmtree(folder)
        page.write_text(replace_ioi_part(text, [ioi_section(name, args.n_prompts) for name in EMBEDDED_MODELS]))
        write_models_table(ROOT)
        return
    for folder in list(OUT.glob("ioi-*")) + list(OUT.glob("circuit-*")):  # only this script's outputs
        shutil.rmtree(folder)
    began = time.time()
    sections = ["## Measured on the embedded models", "",
                f"Measured with `python scripts/make_results.py` (torch {torch.__version__}, "
                f"{platform.machine()} CPU). Names and nouns in the test prompts never occur in the "
                "IOI / SVA sentences the models were trained on. Click a figure to open it at full size.", "",
                "A patching effect is m(clean) - m(clean with the activation patched from the corrupted "
                "prompt), in units of the metric m (the logit difference of the right over the wrong "
                "answer): green cells (positive effects) are activations whose patching lowers the metric, "
                "red cells (negative) ones whose patching raises it.", "",
                IOI_HEADING, ""]
    for name in EMBEDDED_MODELS:
        sections.append(ioi_section(name, args.n_prompts))
    sections += [CIRCUIT_HEADING, "", OVERSHOOT]
    for nodes in ("features", "neurons"):
        sections.append(circuit_section(EMBEDDED_MODELS[0], nodes, args.n_train, args.n_test))
    sections.append(f"Total time of this script: {time.time() - began:.0f} s.")
    (ROOT / "docs" / "results_measured.md").write_text("\n".join(sections) + "\n")
    (OUT / "settings.json").write_text(json.dumps(vars(args)))
    write_models_table(ROOT)


if __name__ == "__main__":
    main()
