"""``captum-relp attribute --task PATH``: AP, AtP and RelP on your own contrastive pairs.

``--task ioi`` runs the IOI experiment (the same as ``captum-relp ioi``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..tasks.file_metrics import METRICS
from . import ioi
from ..experiments.calibration_record import CalibrationFailed
from ..experiments.checkpoint import CheckpointMismatch
from ._common import (
    EXIT_TASK,
    CLIError,
    add_calibration_options,
    add_command,
    add_resume_option,
    add_run_options,
    calibration_default,
    calibration_error,
    default_out,
    load_model_from_args,
    resume_error,
)
from ._results import ResultsFolder
from ._rules_file import check_rules_file, parse_rule_list, read_rules_file

OUTPUTS = {
    "task_results.json": "settings, the task check (under \"task\") and its warnings, PCC with AP with 95% "
                         "bootstrap intervals, the linearity report, notes, wall times",
    "task_pcc.csv": "PCC and interval per component type and method, against AP and against first-order AP",
    "task_scores.npz": "per-prompt scores: one (pairs, layers, positions) array per METHOD/KIND, plus valid and last_pos",
    "task_pairs.jsonl": "the exact pairs used",
    "task_calibration.json": "with --rules calibrated: the calibrated rules, the calibration pairs (line numbers "
                             "and prompts), each candidate's agreement with AP and interval per component type, "
                             "and the choice (pass its path to --rules to reuse it)",
    "task_heatmap_{resid,attn,mlp}.png": "prompt-averaged maps per component type, aligned at the last prompt token",
}
"""Files written to ``--out`` for a task file (``--task ioi`` writes the files of ``captum-relp ioi``)."""


def add_parser(sub) -> None:
    """Register the ``attribute`` subcommand.

    Example:
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_parser(sub)
        >>> sorted(sub.choices)
        ['attribute']
    """
    parser = add_command(sub, "attribute", "AP vs AtP vs RelP on a task: a .csv/.jsonl file of contrastive pairs, or ioi")
    parser.add_argument("--task", required=True,
                        help="a .csv or .jsonl file with clean, corrupted and answers (correct_idx/incorrect_idx "
                             "token ids, answer/foil strings, or a greater-than label), or ioi")
    parser.add_argument("--metric", default=None, choices=METRICS,
                        help="metric of a task file (default: logit-diff; prob-diff for greater-than files)")
    parser.add_argument("--n-prompts", type=int, default=None,
                        help="pairs used: the first N rows of a task file (default: all rows; 100 for ioi)")
    parser.add_argument("--validate", type=int, default=None,
                        help="run AP (and first-order AP) on the first K pairs only, when AP on all is too slow "
                             "(default: all pairs)")
    parser.add_argument("--no-linearity", action="store_true",
                        help="skip AP through the metric's first-order expansion (halves the cost of AP)")
    parser.add_argument("--rules", default="relp",
                        help="RelP rule sets, comma-separated: relp, relp-ah, calibrated (chosen per component "
                             "type on --calibration-prompts rows after the evaluated ones, saved as "
                             "task_calibration.json), or a calibration file PATH.json saved by an earlier run "
                             "(reused as it is, no calibration; it must be for this kind of model)")
    add_calibration_options(parser, "pairs used to calibrate rules for --rules calibrated")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per attribution batch")
    parser.add_argument("--ap-batch-size", type=int, default=64, help="patched copies per forward in AP")
    parser.add_argument("--methods", default=None,
                        help="with --task ioi only: comma-separated among ap, atp, relp (default: ap,atp,relp); "
                             "a task file always runs AP, AtP and RelP (--validate limits AP to fewer pairs)")
    add_run_options(parser, "heatmaps")
    add_resume_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run on a task file (or IOI), print the check and the tables, write the outputs.

    Example:
        >>> from captum_relp.cli import build_parser
        >>> build_parser().parse_args(["attribute", "--task", "ioi"]).func is run
        True
    """
    if args.task == "ioi":
        args.n_prompts = args.n_prompts or 100
        args.methods = args.methods or "ap,atp,relp"
        args.task = None  # output folder: as captum-relp ioi
        return ioi.run(args)
    from ..experiments.task import run_task_experiment
    from ..models import model_name
    from ..tasks.file_task import TaskFile, load_task_file

    if args.methods is not None:
        raise CLIError(f"--methods applies only to --task ioi; a task file always runs AP, AtP and RelP "
                       f"(--validate K runs AP on the first K pairs only), so --methods {args.methods} would be "
                       "ignored")
    rules, rules_file = parse_rule_list(args.rules, ioi.RELP_PRESETS)
    default = calibration_default(args, "calibrated" in rules and rules_file is None, args.rules)
    calibrated = read_rules_file(rules_file) if rules_file else None  # checked before any work
    path = Path(args.task)
    extra = args.calibration_prompts if "calibrated" in rules and calibrated is None else 0
    try:  # a bad file fails here, before the model loads and before anything is written
        loaded = load_task_file(path, None if args.n_prompts is None else args.n_prompts + extra)
    except ValueError as error:
        raise CLIError(str(error), EXIT_TASK) from error
    n = len(loaded) - extra if args.n_prompts is None else min(args.n_prompts, len(loaded))
    task = TaskFile(loaded.pairs[:n], loaded.kind, loaded.path)
    calibration = TaskFile(loaded.pairs[n:n + extra], loaded.kind, loaded.path) if extra else None
    if extra and (n < 2 or len(calibration) < extra):
        raise CLIError(f"--rules calibrated needs {extra} rows after the evaluated ones; {path} has "
                       f"{len(loaded)} rows", EXIT_TASK)
    if args.out is None:
        args.out = default_out(argparse.Namespace(model=args.model, task=path.stem), "attribute")
    with ResultsFolder(args, "attribute") as results:
        checkpoint = results.checkpoint("attribute")  # checked before the model loads
        model, tokenizer = load_model_from_args(args)
        if calibrated is not None:
            check_rules_file(calibrated, rules_file, model, model_name(model))
        try:
            result = run_task_experiment(
                model, tokenizer, task, metric=args.metric, rules=rules, batch_size=args.batch_size,
                validate=args.validate, ap_batch_size=args.ap_batch_size, show_progress=not args.quiet,
                calibration=calibration, seed=args.seed, linearity=not args.no_linearity, calibrated=calibrated,
                calibrated_file=rules_file, checkpoint=checkpoint, calibration_default=default)
        except CheckpointMismatch as error:
            raise resume_error(error) from error
        except CalibrationFailed as error:
            raise calibration_error(error) from error
        except ValueError as error:
            if str(error).startswith(str(path)):  # a row this model's tokenizer cannot encode
                raise CLIError(str(error), EXIT_TASK) from error
            raise
        print(result.format_table())
        for warning in result.competence.warnings:
            print(f"captum-relp: warning: the model may not solve this task: {warning}", file=sys.stderr)
        results.write(lambda folder: result.save(folder, plots=not args.no_plots))
    return 0
