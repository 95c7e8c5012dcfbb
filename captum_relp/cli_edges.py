"""``captum-relp edges``: edge-level circuits (RelP, RelP-AH, EAP, EAP-IG, exact edge patching)."""
from __future__ import annotations

import argparse
from pathlib import Path

METHOD_CHOICES = ("relp", "relp-ah", "eap", "eap-ig", "exact")


def add_parser(sub) -> None:
    """Add the ``edges`` sub-command to an ``argparse`` sub-parser set.

    Examples::

        >>> import argparse
        >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
        >>> add_parser(sub)
        >>> parser.parse_args(["edges", "--method", "relp,eap"]).method
        'relp,eap'
    """
    parser = sub.add_parser("edges", help="edge circuits: RelP / EAP / EAP-IG edge scores, CPR/CMD, PCC")
    parser.add_argument("--model", default=None, help="embedded model name (default), local dir or hub name")
    parser.add_argument("--task", choices=("ioi", "sva"), default="ioi")
    parser.add_argument("--method", default="relp,relp-ah,eap,eap-ig",
                        help=f"comma-separated among {', '.join(METHOD_CHOICES)}")
    parser.add_argument("--no-exact", action="store_true", help="skip exact edge patching (one run per edge)")
    parser.add_argument("--n-prompts", type=int, default=50, help="prompt pairs used to score edges")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out pairs for faithfulness (default: n-prompts)")
    parser.add_argument("--n-steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--fractions", default=None, help="comma-separated circuit sizes from 0 to 1 (default: MIB grid)")
    parser.add_argument("--heldout", action="store_true",
                        help="embedded models: use held-out names/nouns (the shipped models are at chance there)")
    parser.add_argument("--structure", default="across_pp", help="SVA structure")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats of each non-exact method (interleaved; min taken)")
    parser.add_argument("--top-k", type=int, default=20, help="edges drawn in the circuit PNGs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="relp-out")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=cmd_edges)


def cmd_edges(args: argparse.Namespace) -> int:
    """Run the edge experiment and write ``OUT/edges_results.json`` (and PNGs).

    Examples::

        >>> from captum_relp.cli import build_parser
        >>> args = build_parser().parse_args(["edges", "--method", "nope"])
        >>> cmd_edges(args)
        Traceback (most recent call last):
        ...
        captum_relp.cli.CLIError: --method takes a comma-separated list of ('relp', 'relp-ah', 'eap', 'eap-ig', 'exact'), got 'nope'
    """
    from .cli import EXIT_TASK, EXIT_USAGE, CLIError, _device, load_model
    from .experiments.edges import run_edge_experiment

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or any(m not in METHOD_CHOICES for m in methods):
        raise CLIError(f"--method takes a comma-separated list of {METHOD_CHOICES}, got {args.method!r}", EXIT_USAGE)
    if not args.no_exact and "exact" not in methods:
        methods.append("exact")
    if "eap" not in methods:
        methods.insert(0, "eap")  # the cost reference
    fractions = None
    if args.fractions:
        try:
            fractions = [float(f) for f in args.fractions.split(",")]
        except ValueError as error:
            raise CLIError(f"--fractions takes comma-separated numbers, got {args.fractions!r}") from error
    model, tokenizer, names = load_model(args.model, _device(args.device), args.dtype)
    words = None  # the task's training words: the shipped models solve IOI/SVA only for those
    if args.heldout:
        words = names if args.task == "ioi" else _heldout_nouns(args.model)
    try:
        from .edges.graph import build_graph

        build_graph(model)
    except ValueError as error:
        raise CLIError(str(error), EXIT_USAGE) from error
    extra = {} if fractions is None else {"fractions": fractions}
    try:
        result = run_edge_experiment(
            model, tokenizer, task=args.task, methods=methods, n_prompts=args.n_prompts, n_eval=args.n_eval,
            seed=args.seed, words=words, n_steps=args.n_steps, repeats=args.repeats,
            model_name=args.model or "tiny-gpt2-ioi", structure=args.structure, show_progress=not args.quiet,
            **extra,
        )
    except ValueError as error:
        if "fractions" in str(error):
            raise CLIError(str(error)) from error
        if any(w in str(error).lower() for w in ("name", "token", "noun")):
            raise CLIError(f"cannot build {args.task} prompts for this model: {error}", EXIT_TASK) from error
        raise
    print(result.format_table())
    written = result.save(Path(args.out), plots=not args.no_plots, top_k=args.top_k)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _heldout_nouns(model_name):
    from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, load_training_info

    name = model_name or DEFAULT_MODEL
    if name not in EMBEDDED_MODELS:
        return None
    nouns = load_training_info(name).get("heldout_nouns")
    return [tuple(n) for n in nouns] if nouns else None
