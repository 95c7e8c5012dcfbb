"""``captum-relp ioi``: the IOI faithfulness experiment (paper section 5.1)."""
from __future__ import annotations

import argparse
import sys

from ..embedded import heldout_words
from ..experiments.calibration_record import CalibrationFailed, describe_calibration
from ..experiments.checkpoint import CheckpointMismatch
from ..experiments.ioi import run_ioi_experiment
from ..models import model_components, model_name
from ._common import (
    EXIT_TASK,
    CLIError,
    add_calibration_options,
    add_command,
    add_run_options,
    add_resume_option,
    calibration_default,
    calibration_error,
    join_ranks,
    load_model_from_args,
    parse_list,
    resume_error,
)
from ._results import ResultsFolder
from ._rules_file import check_rules_file, parse_rule_list, read_rules_file

RELP_PRESETS = ("relp", "relp-ah", "calibrated")
METHOD_CHOICES = ("ap", "atp", "relp")


OUTPUTS = {
    "ioi_results.json": "settings, PCC tables, wall times and their ratios to AtP, prompt-averaged maps",
    "ioi_pcc.csv": "Pearson correlation with AP per component type and method",
    "ioi_scores.npz": "per-prompt scores, summed over hidden units: arrays <method>/<component type> of shape "
                      "(prompts, layers, positions) and valid, the real (non-pad) positions (prompts, positions)",
    "ioi_heatmap_{resid,attn,mlp}.png": "Figure-2-style heatmaps per component type (unless --no-plots)",
    "ioi_calibration.json": "with --rules calibrated: the calibrated rules, the calibration pairs (prompts), each "
                            "candidate's agreement with AP and interval per component type, and the choice "
                            "(pass its path to --rules to reuse it)",
}
"""Files written to ``--out``."""


def add_parser(sub) -> None:
    """Register the ``ioi`` subcommand.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_parser(sub)
        >>> sorted(sub.choices)
        ['ioi']
    """
    parser = add_command(sub, "ioi", "IOI faithfulness experiment: AP vs AtP vs RelP")
    parser.add_argument("--n-prompts", type=int, default=100, help="IOI prompt pairs (the paper uses 100)")
    parser.add_argument("--rules", default="relp",
                        help="RelP rule sets, comma-separated: relp, relp-ah, calibrated (chosen per "
                             "component type on --calibration-prompts separate pairs, saved as "
                             "ioi_calibration.json), or a calibration file PATH.json saved by an earlier run "
                             "(reused as it is, no calibration; it must be for this kind of model)")
    add_calibration_options(parser, "IOI pairs used to calibrate rules for --rules calibrated")
    parser.add_argument("--batch-size", type=int, default=25, help="prompts per attribution batch")
    parser.add_argument("--ap-batch-size", type=int, default=64, help="patched copies per forward in AP")
    parser.add_argument("--methods", default="ap,atp,relp",
                        help="comma-separated among ap, atp, relp (relp: the --rules); without ap the "
                             "correlations with AP are NaN")
    add_run_options(parser, "heatmaps")
    add_resume_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the experiment, print the tables, write the outputs.

    Example:
        >>> from captum_relp.cli import build_parser
        >>> build_parser().parse_args(["ioi"]).func is run
        True
    """
    rules, rules_file = parse_rule_list(args.rules, RELP_PRESETS)
    methods = parse_list(args.methods.lower(), "--methods", METHOD_CHOICES)
    if "calibrated" in rules and "relp" not in methods:
        raise CLIError(f"--rules {args.rules}: calibrated rules are used by RelP, which --methods {args.methods} "
                       "does not run; add relp to --methods")
    default = calibration_default(args, "calibrated" in rules and rules_file is None, args.rules)
    calibrated = read_rules_file(rules_file) if rules_file else None  # checked before the model loads
    with ResultsFolder(args, "ioi") as results:  # --out checked here, before the model loads
        result = _experiment(args, rules, methods, results, calibrated, rules_file, default)
        if result is not None:  # under torchrun only one rank prints and writes
            _print_result(result)
            results.write(lambda folder: result.save(folder, plots=not args.no_plots))
    return 0


def _experiment(args: argparse.Namespace, rules: list, methods: list, results: ResultsFolder, calibrated=None,
                rules_file=None, default=None):
    """Load the model and run the experiment; ``None`` on a torchrun rank that does not write."""
    writes = join_ranks(args)  # under torchrun: each rank a shard of the prompts
    from ..integrations.distributed import DataParallelSweep

    sweep = DataParallelSweep()  # under torchrun each rank saves its own batches
    checkpoint = results.checkpoint("ioi" if sweep.world_size == 1 else f"ioi-rank{sweep.rank}-of-{sweep.world_size}")
    model, tokenizer = load_model_from_args(args)
    if calibrated is not None:
        check_rules_file(calibrated, rules_file, model, model_name(model))
    if not args.quiet:
        print(cost_notice(model, methods, rules, args.n_prompts, args.batch_size), file=sys.stderr, flush=True)
    try:
        result = run_ioi_experiment(
            model, tokenizer, n_prompts=args.n_prompts, rules=rules, batch_size=args.batch_size,
            seed=args.seed, names=heldout_words(args.model, "ioi"), ap_batch_size=args.ap_batch_size,
            show_progress=not args.quiet, calibration_prompts=args.calibration_prompts,
            methods=[{"ap": "AP", "atp": "AtP", "relp": "RelP"}[m] for m in methods], calibrated=calibrated,
            calibrated_file=rules_file, checkpoint=checkpoint, calibration_default=default,
        )
    except CheckpointMismatch as error:
        raise resume_error(error) from error
    except CalibrationFailed as error:
        raise calibration_error(error) from error
    except ValueError as error:
        if "name" in str(error).lower() or "token" in str(error).lower():
            raise CLIError(f"cannot build IOI prompts for this model: {error}", EXIT_TASK) from error
        raise
    return result if writes else None


def _print_result(result) -> None:
    print(result.format_table())
    if result.config.get("calibration"):
        calibration = result.config["calibration"]
        print(f"\n{describe_calibration(calibration)}:\n{calibration['summary']}")


def cost_notice(model, methods, rules, n_prompts: int, batch_size: int) -> str:
    """What the run will cost, said before the work starts.

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> print(cost_notice(load_embedded()[0], ["ap", "relp"], ["relp"], 100, 25))  # doctest: +ELLIPSIS
        100 IOI pairs in 4 batches, 12 components (resid, attn, mlp x 4 layers)
        AP: one patched run per component and position (~16 per prompt): ~19200 patched runs, ...
        RelP (relp): 2 forward + 1 backward passes per batch
    """
    layers = len(model_components(model).blocks)
    batches = -(-n_prompts // batch_size)
    lines = [f"{n_prompts} IOI pairs in {batches} batches, {3 * layers} components (resid, attn, mlp x {layers} layers)"]
    if "ap" in methods:
        runs = n_prompts * 3 * layers * 16
        lines.append(f"AP: one patched run per component and position (~16 per prompt): ~{runs} patched runs, "
                     "batched into far fewer forward passes; on 2 CPU cores about 4 s per batch of 25 for "
                     "tiny-gpt2-ioi, minutes per batch for 100M+ models (--methods atp,relp skips AP)")
    if "atp" in methods:
        lines.append("AtP: 2 forward + 1 backward passes per batch")
    if "relp" in methods:
        lines += [f"RelP ({rule}): 2 forward + 1 backward passes per batch" for rule in rules]
    return "\n".join(lines)
