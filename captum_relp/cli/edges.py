"""``captum-relp edges``: edge-level circuits (RelP, RelP-AH with local q/k, RelP-AH, EAP, EAP-IG, exact patching)."""
from __future__ import annotations

import argparse

from ..edges.conventions import CONVENTIONS
from ..edges.graph import build_graph
from ..edges.scores import IG_GRIDS
from ..embedded import heldout_words
from ..experiments.calibration_record import CalibrationFailed, describe_calibration
from ..experiments.edges import run_edge_experiment
from ._common import (
    EXIT_TASK,
    CLIError,
    add_command,
    add_rules_options,
    add_run_options,
    calibration_default,
    calibration_error,
    join_ranks,
    load_model_from_args,
    parse_fractions,
    parse_list,
)
from ._results import ResultsFolder
from ._rules_file import check_rules_file, parse_rules_choice, read_rules_file
from ._task_file import TASK_HELP, print_task_check, resolve_task, rows_named

METHOD_CHOICES = ("relp", "relp-ah", "relp-ah-qk", "relp-ah+qk", "calibrated", "eap", "eap-ig", "exact")

OUTPUTS = {
    "edges_results.json": "per method: cpr, cmd, faithfulness curve, pcc_vs_exact, seconds, pass counts; "
                          "meta.convention",
    "edges_scores.npz": "per-edge scores, mean over prompts: edges (the edge names, in order) and one float64 "
                        "array per method (exact included unless --no-exact); the PCCs are computed from these",
    "edges_faithfulness.png": "faithfulness against circuit size (fraction of edges) per method",
    "edges_calibration.json": "with --rules calibrated: the calibrated rules, the calibration pairs (prompts), each "
                              "candidate's agreement with AP and interval per component type, and the choice "
                              "(pass its path to --rules to reuse it)",
    "edges_circuit_<method>.png": "each method's greedy connected circuit of --top-k edges (unless --no-plots)",
}
"""Files written to ``--out``."""


def add_parser(sub) -> None:
    """Register the ``edges`` subcommand.

    Examples::

        >>> import argparse
        >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
        >>> add_parser(sub)
        >>> parser.parse_args(["edges", "--method", "relp,eap"]).method
        'relp,eap'
    """
    parser = add_command(sub, "edges", "edge circuits: RelP / EAP / EAP-IG edge scores, CPR/CMD, PCC")
    parser.add_argument("--task", default="ioi", help=TASK_HELP)
    parser.add_argument("--method", default="relp-ah-qk,relp,relp-ah,eap,eap-ig",
                        help=f"comma-separated among {', '.join(METHOD_CHOICES)}")
    parser.add_argument("--no-exact", action="store_true", help="skip exact edge patching (one run per edge)")
    parser.add_argument("--n-prompts", type=int, default=50, help="prompt pairs used to score edges")
    parser.add_argument("--n-eval", type=int, default=None, help="separate pairs for faithfulness (default: as many as --n-prompts)")
    parser.add_argument("--n-steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--convention", choices=sorted(CONVENTIONS), default="library",
                        help="circuit sizes, rounding, CPR ranking, key/value inputs and EAP-IG grid: the "
                             "library's or MIB's circuit track (docs: Edge-level RelP)")
    parser.add_argument("--ig-grid", choices=IG_GRIDS, default=None,
                        help="EAP-IG points k/m: right k=1..m (paper), left k=0..m-1 (MIB) (default: the --convention's, "
                             + ", ".join(f"{c.ig_grid} for {n}" for n, c in sorted(CONVENTIONS.items())) + ")")
    parser.add_argument("--greedy", action="store_true",
                        help="MIB's greedy connected circuits (from the logits back) instead of global top-k")
    parser.add_argument("--fractions", default=None,
                        help="comma-separated circuit sizes in [0, 1] (default: the --convention's grid, "
                             + "; ".join(f"{n}: {len(c.fractions)} sizes from {c.fractions[0]:g} to {c.fractions[-1]:g}"
                                         for n, c in sorted(CONVENTIONS.items())) + ")")
    parser.add_argument("--training-words", action="store_true",
                        help="shipped models: prompts from the names/nouns seen in training instead of the "
                             "held-out ones (which captum-relp ioi and circuit use too)")
    parser.add_argument("--heldout", action="store_true", help=argparse.SUPPRESS)  # held-out words are the default now
    parser.add_argument("--structure", default="across_pp", help="SVA structure")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per scoring method (min taken)")
    parser.add_argument("--top-k", type=int, default=20, help="edges drawn in the circuit PNGs")
    add_rules_options(parser, "preset: the rule sets of --method only; calibrated: also score edges with RelP under rules chosen per component type on "
                              "--calibration-prompts separate pairs (method 'calibrated', rules saved as "
                              "edges_calibration.json); PATH.json: method 'calibrated' uses the rules of a "
                              "calibration file saved by an earlier run (no calibration; it must be for this kind "
                              "of model)")
    add_run_options(parser, "PNGs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the edge experiment, print the table, write ``edges_results.json``, ``edges_scores.npz`` and PNGs.

    Example:
        >>> from captum_relp.cli import build_parser
        >>> build_parser().parse_args(["edges"]).func is run
        True
    """
    methods = parse_list(args.method, "--method", METHOD_CHOICES)
    rules_file = parse_rules_choice(args)
    if args.rules != "preset" and "calibrated" not in methods:
        methods.append("calibrated")
    default = calibration_default(args, "calibrated" in methods and rules_file is None, args.rules)
    calibrated = read_rules_file(rules_file) if rules_file else None  # checked before the model loads
    if not args.no_exact and "exact" not in methods:
        methods.append("exact")
    if "eap" not in methods:
        methods.insert(0, "eap")  # the cost reference
    fractions = parse_fractions(args.fractions)
    task = resolve_task(args, "edges")  # a task file: checked before the model loads
    with ResultsFolder(args, "edges") as results:  # --out checked here, before the model loads
        with rows_named(task):
            result = _experiment(args, methods, fractions, task, calibrated, rules_file, default)
        if result is not None:  # under torchrun only one rank prints and writes
            _print_result(result)
            results.write(lambda folder: result.save(folder, plots=not args.no_plots, top_k=args.top_k))
    return 0


def _experiment(args: argparse.Namespace, methods: list, fractions, task=None, calibrated=None, rules_file=None,
                default=None):
    """Load the model and run the experiment; ``None`` on a torchrun rank that does not write."""
    writes = join_ranks(args)  # under torchrun: each rank a share of exact patching and of the curves
    model, tokenizer = load_model_from_args(args)
    if calibrated is not None:
        check_rules_file(calibrated, rules_file, model, args.model)
    words = None if args.training_words or task else heldout_words(args.model, args.task)
    try:
        build_graph(model)
    except ValueError as error:
        raise CLIError(str(error)) from error
    extra = {} if fractions is None else {"fractions": fractions}
    if calibrated is not None:
        extra.update(calibrated=calibrated, calibrated_file=rules_file)
    try:
        result = run_edge_experiment(
            model, tokenizer, task=task or args.task, methods=methods, n_prompts=args.n_prompts, n_eval=args.n_eval,
            seed=args.seed, words=words, n_steps=args.n_steps, repeats=args.repeats, model_name=args.model,
            structure=args.structure, show_progress=not args.quiet, convention=args.convention,
            ig_grid=args.ig_grid, greedy=args.greedy,
            calibration_prompts=args.calibration_prompts, calibration_default=default, **extra,
        )
    except CalibrationFailed as error:
        raise calibration_error(error) from error
    except ValueError as error:
        if "fractions" in str(error):
            raise CLIError(str(error)) from error
        if any(w in str(error).lower() for w in ("name", "token", "noun")):
            raise CLIError(f"cannot build {args.task} prompts for this model: {error}", EXIT_TASK) from error
        raise
    return result if writes else None


def _print_result(result) -> None:
    print_task_check(result.info.get("task_check"))
    print(result.format_table())
    if "calibration" in result.info:
        calibration = result.info["calibration"]
        print(f"\n{describe_calibration(calibration)}:\n{calibration['summary']}")
