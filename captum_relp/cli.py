"""Command line: ``captum-relp ioi`` (and ``captum-relp circuit``).

Exit codes: 0 success, 2 bad arguments or unknown model, 3 the task cannot be
built for this model (e.g. its tokenizer splits every name), 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

EXIT_USAGE, EXIT_TASK, EXIT_ERROR = 2, 3, 1
DTYPES = ("float32", "bfloat16", "float16")


class CLIError(Exception):
    """An error with a message for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def load_model(name: Optional[str], device: str, dtype: str) -> Tuple[object, object, Optional[List[str]]]:
    """Model, tokenizer and (for embedded models) the held-out names used for evaluation.

    ``name`` is an embedded model name (default: the package's), a local directory
    saved with ``save_pretrained``, or a Hugging Face hub name (needs network).

    Example:
        >>> model, tokenizer, names = load_model(None, "cpu", "float32")
        >>> type(model).__name__
        'GPT2LMHeadModel'
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model_path, load_training_info

    torch_dtype = getattr(torch, dtype)
    names = None
    if name is None or name in EMBEDDED_MODELS:
        name = name or DEFAULT_MODEL
        path = str(embedded_model_path(name))
        info = load_training_info(name)
        names = info.get("heldout_names") or None
    else:
        path = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        hint = "" if Path(path).exists() else " (not a local directory; hub names need network access)"
        raise CLIError(f"cannot load model {name!r}{hint}: {str(error).splitlines()[0]}") from error
    return model.to(device).eval(), tokenizer, names


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA device is available")
    return requested


def _rules(text: str) -> List[str]:
    from .registry import PRESETS

    rules = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rules if r not in PRESETS or r == "none"]
    if not rules or unknown:
        raise CLIError(f"--rules takes a comma-separated list of {['relp', 'relp-ah']}, got {text!r}")
    return rules


def cmd_ioi(args: argparse.Namespace) -> int:
    from .experiments.ioi import run_ioi_experiment

    rules = _rules(args.rules)
    model, tokenizer, names = load_model(args.model, _device(args.device), args.dtype)
    try:
        result = run_ioi_experiment(
            model, tokenizer, n_prompts=args.n_prompts, rules=rules, batch_size=args.batch_size,
            seed=args.seed, names=names, ap_batch_size=args.ap_batch_size, show_progress=not args.quiet,
        )
    except ValueError as error:
        if "name" in str(error).lower() or "token" in str(error).lower():
            raise CLIError(f"cannot build IOI prompts for this model: {error}", EXIT_TASK) from error
        raise
    print(result.format_table())
    written = result.save(Path(args.out), plots=not args.no_plots)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-relp``.

    Example:
        >>> build_parser().parse_args(["ioi", "--n-prompts", "4"]).n_prompts
        4
    """
    parser = argparse.ArgumentParser(prog="captum-relp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ioi = sub.add_parser("ioi", help="IOI faithfulness experiment: AP vs AtP vs RelP")
    ioi.add_argument("--model", default=None,
                     help="embedded model name (default: tiny-gpt2-ioi), local directory, or hub name")
    ioi.add_argument("--n-prompts", type=int, default=100)
    ioi.add_argument("--rules", default="relp", help="RelP presets, comma-separated: relp, relp-ah")
    ioi.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    ioi.add_argument("--dtype", default="float32", choices=DTYPES)
    ioi.add_argument("--batch-size", type=int, default=25, help="prompts per attribution batch")
    ioi.add_argument("--ap-batch-size", type=int, default=64, help="patched copies per forward in AP")
    ioi.add_argument("--seed", type=int, default=0)
    ioi.add_argument("--out", default="relp-out", help="output directory (default: relp-out)")
    ioi.add_argument("--no-plots", action="store_true")
    ioi.add_argument("--quiet", action="store_true", help="no progress bars")
    ioi.set_defaults(func=cmd_ioi)
    _add_circuit_parser(sub)
    from .cli_edges import add_parser as add_edges_parser
    add_edges_parser(sub)
    return parser


def _add_circuit_parser(sub) -> None:
    try:
        from .circuits.cli import add_parser
    except ImportError:
        return
    add_parser(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("n_prompts", "batch_size", "ap_batch_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"captum-relp: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CLIError as error:
        print(f"captum-relp: error: {error}", file=sys.stderr)
        return error.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
