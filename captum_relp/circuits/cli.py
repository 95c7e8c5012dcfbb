"""``captum-relp circuit``: circuit discovery and faithfulness/completeness curves."""
from __future__ import annotations

import argparse
from pathlib import Path

from .effects import METHODS
from .faithfulness import ERROR_POLICIES
from .nodes import NODE_KINDS


def add_parser(sub) -> None:
    parser = sub.add_parser("circuit", help="circuit discovery: faithfulness/completeness of RelP, AtP, IG")
    parser.add_argument("--task", choices=("sva", "ioi"), default="sva")
    parser.add_argument("--method", default="relp,atp,ig", help="comma-separated: relp, atp, ig")
    parser.add_argument("--nodes", choices=NODE_KINDS, default="features")
    parser.add_argument("--model", default=None, help="embedded model name (default), local dir or hub name")
    parser.add_argument("--sae-dir", default=None,
                        help="folder with one dictionary per submodule (resid_0, attn_0, mlp_0, ...), "
                             "dictionary_learning or SAELens format (default: the embedded model's)")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--errors", choices=ERROR_POLICIES, default="keep", help="error nodes in circuits")
    parser.add_argument("--include-early-layers", action="store_true",
                        help="also evaluate the first third of layers (excluded by default, appendix A.2)")
    parser.add_argument("--n-steps", type=int, default=10, help="IG integration steps")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="relp-out")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=cmd_circuit)


def cmd_circuit(args: argparse.Namespace) -> int:
    from ..cli import EXIT_USAGE, CLIError, _device, load_model
    from .experiment import run_circuit_experiment

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise CLIError(f"--method takes a comma-separated list of {METHODS}, got {args.method!r}", EXIT_USAGE)
    model, tokenizer, _ = load_model(args.model, _device(args.device), args.dtype)
    heldout = _heldout(args.model, args.task)
    saes = _saes(args) if args.nodes == "features" else None
    result = run_circuit_experiment(
        model, tokenizer, task=args.task, methods=methods, nodes=args.nodes, saes=saes,
        n_train=args.n_train, n_test=args.n_test, seed=args.seed, error_policy=args.errors,
        exclude_first_third=not args.include_early_layers, n_steps=args.n_steps,
        batch_size=args.batch_size, heldout=heldout, show_progress=not args.quiet,
    )
    print(result.summary())
    written = result.save(Path(args.out), plots=not args.no_plots)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _heldout(model_name, task):
    from ..embedded import DEFAULT_MODEL, EMBEDDED_MODELS, load_training_info

    name = model_name or DEFAULT_MODEL
    if name not in EMBEDDED_MODELS:
        return None
    info = load_training_info(name)
    return info.get("heldout_nouns") if task == "sva" else info.get("heldout_names")


def _saes(args):
    from ..cli import CLIError

    if args.sae_dir is None:
        from ..embedded import DEFAULT_MODEL, EMBEDDED_MODELS

        name = args.model or DEFAULT_MODEL
        if name not in EMBEDDED_MODELS:
            raise CLIError("--nodes features needs --sae-dir for a model the package does not ship")
        from .sae import load_embedded_saes

        return load_embedded_saes(name)
    from .sae import load_sae

    folder = Path(args.sae_dir)
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    saes = {p.name.split(".")[0]: load_sae(p) for p in entries if p.is_dir() or p.suffix in (".pt", ".safetensors")}
    if not saes:
        raise CLIError(f"no dictionaries found in {folder}")
    return saes
