"""What every subcommand shares: errors with exit codes, device/dtype options, model loading."""
from __future__ import annotations

import argparse
from typing import Any, Optional, Tuple

from ..embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from ..embedded.fetch import FETCHABLE

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TASK = 0, 1, 2, 3
DTYPES = ("float32", "bfloat16", "float16")


class CLIError(Exception):
    """An error with a message for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a clear error for missing CUDA.

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA device is available")
    return requested


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand parser (defaults shown in ``--help``) with the model options already added."""
    parser = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype`` (the same in every subcommand)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"shipped model ({', '.join(EMBEDDED_MODELS)}), fetched model ({', '.join(FETCHABLE)}), "
                             "GGUF file (.gguf), local directory, or hub name")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights dtype")


def add_run_options(parser: argparse.ArgumentParser, plots: str) -> None:
    """``--seed``, ``--out``, ``--no-plots``, ``--quiet`` (the same in every subcommand)."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")
    parser.add_argument("--out", default="relp-out", help="output directory")
    parser.add_argument("--no-plots", action="store_true", help=f"do not write {plots}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_rules_options(parser: argparse.ArgumentParser, help: str) -> None:
    """``--rules preset|calibrated`` and ``--calibration-prompts`` (circuit and edges)."""
    parser.add_argument("--rules", default="preset", choices=("preset", "calibrated"), help=help)
    parser.add_argument("--calibration-prompts", type=int, default=20,
                        help="pairs used to calibrate rules for --rules calibrated")


def join_ranks(args: argparse.Namespace) -> bool:
    """Under ``torchrun``: join the process group and use this rank's GPU. True if this rank writes.

    Outside ``torchrun`` nothing happens and the single process writes.
    """
    from ..integrations.distributed import DataParallelSweep, init_from_env, rank_device

    if init_from_env():
        args.device = rank_device(resolve_device(args.device))
    return DataParallelSweep().is_main


def load_model_from_args(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The model and tokenizer named by ``--model``/``--device``/``--dtype`` (exit code 2 if unloadable)."""
    from ..embedded import load_model

    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar too
    try:
        return load_model(args.model, resolve_device(args.device), args.dtype)
    except OSError as error:
        raise CLIError(str(error)) from error


def check_out_dir(path: str) -> None:
    """``--out`` must be a directory or a path that can become one (checked before any work)."""
    from pathlib import Path

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CLIError(f"--out {out}: {parent} is not a directory")


def parse_list(text: str, option: str, allowed: Optional[Tuple[str, ...]] = None) -> list:
    """A comma-separated option value as a list (an error names the option when empty)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or (allowed is not None and any(item not in allowed for item in items)):
        choices = f" of {list(allowed)}" if allowed is not None else ""
        raise CLIError(f"{option} takes a comma-separated list{choices}, got {text!r}")
    return items
