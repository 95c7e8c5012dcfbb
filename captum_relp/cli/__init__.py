"""Command line: ``captum-relp attribute``, ``captum-relp ioi``, ``captum-relp circuit`` and ``captum-relp edges``.

Exit codes: 0 success, 1 any other error, 2 bad arguments or a model that cannot
be loaded, 3 the task cannot be built for this model (e.g. its tokenizer splits
every name).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import attribute, circuit, edges, ioi
from ._common import DTYPES, EXIT_ERROR, EXIT_OK, EXIT_TASK, EXIT_USAGE, CLIError
from ._threads import apply_threads

SUBCOMMANDS = (attribute, ioi, circuit, edges)
_POSITIVE = ("threads", "validate", "edge_nodes", "n_prompts", "batch_size", "ap_batch_size", "n_train", "n_test", "n_steps", "calibration_prompts",
             "n_eval", "repeats", "top_k")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-relp``.

    Example:
        >>> build_parser().parse_args(["ioi", "--n-prompts", "4"]).n_prompts
        4
    """
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="captum-relp", description="Relevance Patching (RelP) experiments: your own task or IOI, node circuits and edge circuits.",
        epilog="Exit codes: 0 success, 1 other error, 2 bad arguments or unloadable model, "
               "3 task cannot be built for this model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``captum-relp`` with ``argv``; returns the exit code.

    Example:
        >>> main(["ioi", "--n-prompts", "0"])  # the message goes to stderr
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a subcommand is required: show what there is (usage error)
        parser.print_help()
        return EXIT_USAGE
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"captum-relp: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    apply_threads(args)
    finished = False
    try:
        code = int(args.func(args) or EXIT_OK)
        finished = True
        return code
    except CLIError as error:
        if not error.reported:  # a results folder reports it before what it kept
            print(f"captum-relp: error: {error}", file=sys.stderr)
        return error.code
    finally:  # under torchrun: every rank leaves the process group before the interpreter exits
        from ..integrations.distributed import leave_process_group

        leave_process_group(barrier=finished)


__all__ = ["main", "build_parser", "CLIError", "DTYPES", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_TASK"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
