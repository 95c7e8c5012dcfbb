"""``captum-relp circuit``: circuit discovery and faithfulness/completeness curves (section 5.2)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..attr import get_method
from ..circuits.faithfulness import ERROR_POLICIES
from ..circuits.nodes import NODE_KINDS
from ..circuits.sae import load_sae
from ..embedded import DEFAULT_MODEL, heldout_words, is_embedded, load_embedded_saes
from ..experiments.calibration_record import CalibrationFailed, describe_calibration
from ..experiments.circuits import run_circuit_experiment
from ..models import model_name
from ._common import (
    CLIError,
    add_command,
    add_rules_options,
    add_run_options,
    calibration_default,
    calibration_error,
    join_ranks,
    load_model_from_args,
    parse_list,
)
from ._results import ResultsFolder
from ._rules_file import check_rules_file, parse_rules_choice, read_rules_file
from ._task_file import TASK_HELP, print_task_check, resolve_task, rows_named

OUTPUTS = {
    "circuit_results.json": "settings, faithfulness/completeness curves per setting and method, cost",
    "circuit_faithfulness.png": "Figure-3-style curves (unless --no-plots)",
    "circuit_edges.json": "with --edges: top nodes and the edges between them, per setting and method",
    "circuit_calibration_<setting>.json": "with --rules calibrated: one file per setting with the calibrated rules, "
                                          "the calibration pairs (prompts), each candidate's agreement with AP and "
                                          "interval per component type, and the choice (pass its path to --rules "
                                          "to reuse it)",
}
"""Files written to ``--out``."""


def add_parser(sub) -> None:
    """Register the ``circuit`` subcommand.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_parser(sub)
        >>> sorted(sub.choices)
        ['circuit']
    """
    parser = add_command(sub, "circuit", "circuit discovery: faithfulness/completeness of RelP, AtP, IG")
    parser.add_argument("--task", default="sva", help=TASK_HELP)
    parser.add_argument("--method", default="RelP,AtP,IG",
                        help="comma-separated, case-insensitive: RelP, RelP+AH (or relp-ah), AtP, IG")
    parser.add_argument("--nodes", choices=NODE_KINDS, default="features",
                        help="node space: whole components, MLP neurons, or SAE features + error nodes")
    parser.add_argument("--sae-dir", default=None,
                        help="folder with one dictionary per submodule (resid_0, attn_0, mlp_0, ...), "
                             "dictionary_learning or SAELens format (default: the dictionaries shipped with the model; "
                             "required for other models)")
    parser.add_argument("--n-train", type=int, default=300, help="pairs used to score nodes")
    parser.add_argument("--n-test", type=int, default=100, help="held-out pairs used to evaluate circuits")
    parser.add_argument("--errors", choices=ERROR_POLICIES, default="keep", help="error nodes in circuits")
    parser.add_argument("--include-early-layers", action="store_true",
                        help="also evaluate the first third of layers (excluded by default, appendix A.2)")
    parser.add_argument("--n-steps", type=int, default=10, help="IG integration steps")
    parser.add_argument("--batch-size", type=int, default=50, help="pairs per attribution batch")
    parser.add_argument("--edges", action="store_true",
                        help="also score edges between the top nodes (RelP rules or AtP gradients)")
    parser.add_argument("--edge-nodes", type=int, default=30, help="top nodes kept for --edges")
    add_rules_options(parser, "preset: the paper's (RelP+AH adds the AH-rule); calibrated: RelP uses rules chosen "
                              "per component type on the first --calibration-prompts training pairs of each setting "
                              "(saved as circuit_calibration_<setting>.json); PATH.json: RelP uses the rules of a "
                              "calibration file saved by an earlier run in every setting (no calibration; it must "
                              "be for this kind of model)")
    add_run_options(parser, "the curve plot")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the experiment, print the summary, write the outputs.

    Example:
        >>> from captum_relp.cli import build_parser
        >>> build_parser().parse_args(["circuit"]).func is run
        True
    """
    try:
        methods = [get_method(m).name for m in parse_list(args.method, "--method")]
    except ValueError as error:
        raise CLIError(f"--method: {error}") from error
    if "AP" in methods:
        raise CLIError("--method: circuits are scored with RelP, RelP+AH, AtP or IG, not AP")
    rules_file = parse_rules_choice(args)
    if args.rules != "preset" and "RelP" not in methods:
        raise CLIError(f"--rules {args.rules}: calibrated rules are used by RelP, which --method {args.method} "
                       "does not run; add RelP to --method")
    default = calibration_default(args, args.rules == "calibrated", args.rules)
    calibrated = read_rules_file(rules_file) if rules_file else None  # checked before the model loads
    task = resolve_task(args, "circuit")  # a task file: checked before the model loads
    with ResultsFolder(args, "circuit") as results:  # --out checked here, before the model loads
        if not args.quiet:
            _say(cost_notice(methods, args.nodes, args.n_steps))
        with rows_named(task):
            result = _experiment(args, methods, task, calibrated, rules_file, default)
        if result is not None:  # under torchrun only one rank prints and writes
            _print_result(result)
            results.write(lambda folder: result.save(folder, plots=not args.no_plots))
    return 0


def _experiment(args: argparse.Namespace, methods: list, task=None, calibrated=None, rules_file=None, default=None):
    """Load the SAEs and the model, run the experiment; ``None`` on a torchrun rank that does not write."""
    saes = _saes(args) if args.nodes == "features" else None
    writes = join_ranks(args)  # under torchrun: each rank scores a shard of the batches
    model, tokenizer = load_model_from_args(args)
    if calibrated is not None:
        check_rules_file(calibrated, rules_file, model, model_name(model))
    try:
        result = run_circuit_experiment(
            model, tokenizer, task=task or args.task, methods=methods, nodes=args.nodes, saes=saes,
            n_train=args.n_train, n_test=args.n_test, seed=args.seed, error_policy=args.errors,
            exclude_first_third=not args.include_early_layers, n_steps=args.n_steps,
            batch_size=args.batch_size, heldout=None if task else heldout_words(args.model, args.task),
            show_progress=not args.quiet, report=None if args.quiet else _say,
            edge_nodes=args.edge_nodes if args.edges else 0,
            calibration_prompts=args.calibration_prompts if args.rules == "calibrated" else 0,
            calibrated=calibrated, calibrated_file=rules_file, calibration_default=default,
        )
    except CalibrationFailed as error:
        raise calibration_error(error) from error
    return result if writes else None


def _print_result(result) -> None:
    print_task_check(result.task_check)
    print(result.summary())
    for setting, calibration in result.config.get("calibration", {}).items():
        heading = describe_calibration(calibration, "training pairs", f"calibrated rules for RelP, {setting}")
        print(f"\n{heading}:\n{calibration['summary']}")


def cost_notice(methods, nodes: str, n_steps: int) -> str:
    """What the run will cost, said before the model is loaded.

    Example:
        >>> print(cost_notice(["RelP", "IG"], "components", 10))
        scoring nodes: RelP 2 forward + 1 backward passes per batch; IG 10 interpolation steps per node group
        >>> "warning: IG with --nodes features" in cost_notice(["IG"], "features", 10)
        True
    """
    per = {"RelP": "2 forward + 1 backward passes per batch", "RelP+AH": "2 forward + 1 backward passes per batch",
           "AtP": "2 forward + 1 backward passes per batch", "IG": f"{n_steps} interpolation steps per node group"}
    text = "scoring nodes: " + "; ".join(f"{m} {per.get(m, '')}".strip() for m in methods)
    if "IG" in methods and nodes == "features":
        others = ",".join(m for m in methods if m != "IG") or "RelP"
        text += (f"\nwarning: IG with --nodes features runs {n_steps} steps for each of the many feature/error "
                 "groups: expect it to take 10x or more RelP's time (about 13 min for the defaults on 2 CPU "
                 f"cores); pass --method {others} to skip it")
    return text


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _saes(args: argparse.Namespace):
    if args.sae_dir is None:
        if not is_embedded(args.model):
            raise CLIError("--nodes features needs --sae-dir for a model the package does not ship")
        return load_embedded_saes(args.model or DEFAULT_MODEL)
    folder = Path(args.sae_dir)
    if not folder.is_dir():
        raise CLIError(f"--sae-dir {folder} is not a directory")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    saes = {p.name.split(".")[0]: load_sae(p) for p in entries if p.is_dir() or p.suffix in (".pt", ".safetensors")}
    if not saes:
        raise CLIError(f"no dictionaries found in {folder}")
    return saes
