"""What every subcommand shares: errors with exit codes, device/dtype options, model loading."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Tuple

from ..embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from ._threads import add_threads_option
from ..embedded.fetch import FETCHABLE

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TASK = 0, 1, 2, 3
DTYPES = ("float32", "bfloat16", "float16")
OUT_ROOT = "relp-out"


class CLIError(Exception):
    """An error with a message for the user and an exit code; ``reported`` once it has been printed."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
        self.reported = False


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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default; an option whose default is computed at run time (``None`` in
    the parser) states it in words in its own help, which is shown as written.

    Example:
        >>> parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
        >>> _ = parser.add_argument("--n", default=3, help="count")
        >>> _ = parser.add_argument("--out", default=None, help="folder (default: next to the input)")
        >>> text = parser.format_help()
        >>> "(default: 3)" in text, "(default: None)" in text
        (True, False)
    """

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand parser (defaults shown in ``--help``) with the model options already added."""
    parser = sub.add_parser(name, help=help, formatter_class=DefaultsHelpFormatter)
    add_model_options(parser)
    add_threads_option(parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype`` (the same in every subcommand)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"shipped model ({', '.join(EMBEDDED_MODELS)}), fetched model ({', '.join(FETCHABLE)}), "
                             "GGUF file (.gguf), local directory, or hub name")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights dtype")


def add_run_options(parser: argparse.ArgumentParser, plots: str) -> None:
    """``--seed``, ``--out``, ``--overwrite``, ``--no-plots``, ``--quiet`` (the same in every subcommand)."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")
    command = parser.prog.split()[-1]
    example = default_out(argparse.Namespace(model=DEFAULT_MODEL, task=parser.get_default("task")), command)
    parts = "the command and the model" if command == "ioi" else "the command, the --task and the model"
    if parser.get_default("convention") is not None:
        parts += " (and --convention when not library)"
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: a folder under {OUT_ROOT}/ named after {parts}, "
                             f"e.g. {example})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (its files this run does not "
                             "rewrite are removed) once this run has completed; an interrupted or failed run "
                             "leaves them as they were. Without it such a directory is refused")
    parser.add_argument("--no-plots", action="store_true", help=f"do not write {plots}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    """``--resume`` (the commands that checkpoint each finished batch in ``--out``)."""
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: reuse the finished batches saved in "
                             "--out/.captum-relp-checkpoint when they were made with the same model, pairs and "
                             "settings (else the run is refused). Without it such a checkpoint is refused, or "
                             "discarded with --overwrite")


def resume_error(error: Exception) -> "CLIError":
    """A checkpoint of another configuration, as an error naming ``--resume`` (exit code 2)."""
    return CLIError(f"--resume: {error}; rerun with the settings of that run, or without --resume and with "
                    "--overwrite to discard its checkpoint and start again")


def add_rules_options(parser: argparse.ArgumentParser, help: str) -> None:
    """``--rules preset|calibrated|PATH.json``, ``--calibration-prompts`` and ``--calibration-default``
    (circuit and edges; the values are checked when the command runs)."""
    parser.add_argument("--rules", default="preset", metavar="{preset,calibrated,PATH.json}", help=help)
    add_calibration_options(parser, "pairs used to calibrate rules for --rules calibrated")


CALIBRATION_DEFAULTS = ("best-preset", "gradient", "relp", "relp-ah")
"""``--calibration-default``: the best fixed preset per component type, or one preset."""


def add_calibration_options(parser: argparse.ArgumentParser, prompts_help: str) -> None:
    """``--calibration-prompts`` (its help: ``prompts_help``) and ``--calibration-default``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_calibration_options(parser, "pairs")
        >>> args = parser.parse_args(["--calibration-default", "gradient"])
        >>> args.calibration_prompts, args.calibration_default
        (20, 'gradient')
    """
    parser.add_argument("--calibration-prompts", type=int, default=20, help=prompts_help)
    parser.add_argument("--calibration-default", default=None, choices=CALIBRATION_DEFAULTS,
                        help="with --rules calibrated: the rule set each component type keeps unless another "
                             "candidate agrees better with activation patching beyond the bootstrap noise on the "
                             "calibration pairs. best-preset: whichever of gradient (plain gradients, as AtP), "
                             "relp (the paper's rules) and relp-ah (relp with the AH-rule) agrees best on those "
                             "pairs; gradient, relp or relp-ah: that preset (default: best-preset)")


def calibration_default(args: argparse.Namespace, calibrates: bool, rules: str) -> Optional[str]:
    """``--calibration-default`` of a run that calibrates: its value, ``best-preset`` when not
    given. ``None`` for a run that does not calibrate (``rules``: its ``--rules``, named in the
    message), where giving the option is a usage error naming it.

    Example:
        >>> calibration_default(argparse.Namespace(calibration_default=None), True, "calibrated")
        'best-preset'
        >>> calibration_default(argparse.Namespace(calibration_default="relp"), False, "relp")
        Traceback (most recent call last):
        ...
        captum_relp.cli._common.CLIError: --calibration-default applies only when the run calibrates (--rules calibrated); this run does not (--rules relp)
    """
    if calibrates:
        return args.calibration_default or CALIBRATION_DEFAULTS[0]
    if args.calibration_default is not None:
        loaded = " reuses a calibration file and" if any(
            item.strip().lower().endswith(".json") for item in rules.split(",")) else ""
        raise CLIError(f"--calibration-default applies only when the run calibrates (--rules calibrated); "
                       f"this run{loaded} does not (--rules {rules})")
    return None


def calibration_error(error: Exception) -> "CLIError":
    """A calibration that could not run (e.g. its pairs have no effect), as an error naming
    ``--rules calibrated`` (exit code 1)."""
    return CLIError(f"--rules calibrated: {error}", EXIT_ERROR)


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


MANIFEST = "captum-relp-run.json"
"""Written last: the command, its settings and the files of the run."""


def default_out(args: argparse.Namespace, command: str) -> str:
    """``relp-out/COMMAND[-TASK]-MODEL[-CONVENTION]``: runs that differ in command, task, model or
    (edges) a non-default convention land apart.

    Example:
        >>> default_out(argparse.Namespace(model="tiny-llama-ioi", task="sva"), "circuit")
        'relp-out/circuit-sva-tiny-llama-ioi'
    """
    import re

    model = str(args.model).rstrip("/")
    model = Path(model).name if Path(model).exists() else model.replace("/", "--")
    convention = getattr(args, "convention", None)
    parts = [command, getattr(args, "task", None), re.sub(r"[^A-Za-z0-9._-]+", "-", model),
             convention if convention not in (None, "library") else None]
    return f"{OUT_ROOT}/" + "-".join(p for p in parts if p)


RESULT_PATTERNS = ("task_results.json", "task_pcc.csv", "task_scores.npz", "task_pairs.jsonl", "task_heatmap_*.png",
                   "ioi_results.json", "ioi_pcc.csv", "ioi_scores.npz", "ioi_heatmap_*.png",
                   "task_calibration.json", "ioi_calibration.json",
                   "circuit_results.json", "circuit_faithfulness.png", "circuit_edges.json", "circuit_calibration_*.json",
                   "edges_results.json", "edges_scores.npz", "edges_faithfulness.png", "edges_circuit_*.png", "edges_calibration.json",
                   MANIFEST)
"""Every file a subcommand writes (its ``OUTPUTS``, as glob patterns; a test keeps them in step)."""


def earlier_run_files(out: Path) -> list:
    """The files in ``out`` that an earlier captum-relp run wrote (its manifest's list and known names).

    Example:
        >>> earlier_run_files(Path("no-such-directory"))
        []
    """
    import json

    if not out.is_dir():
        return []
    found = {p for pattern in RESULT_PATTERNS for p in out.glob(pattern) if p.is_file()}
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text()).get("files", [])
        except (ValueError, AttributeError):
            listed = []
        found.update(out / Path(name).name for name in listed if (out / Path(name).name).is_file())
    return sorted(found)


def check_writable(out: Path) -> None:
    """Create ``out`` and a file in it (both removed again): an error, exit code 2, if that fails.

    Example:
        >>> check_writable(Path("/proc/no-such-dir"))
        Traceback (most recent call last):
        ...
        captum_relp.cli._common.CLIError: --out /proc/no-such-dir cannot be written: No such file or directory
    """
    import tempfile

    missing = [p for p in [out, *out.parents] if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".captum-relp-probe-"):
            pass
    except OSError as error:
        raise CLIError(f"--out {out} cannot be written: {error.strerror or error}") from error
    finally:
        for path in missing:
            try:
                path.rmdir()
            except OSError:
                pass


def prepare_out(args: argparse.Namespace, command: str) -> list:
    """Before any work: resolve ``--out`` (set on ``args``), check it can be written, and refuse a
    directory that holds another run's results unless ``--overwrite``. Returns those earlier files.

    Example:
        >>> import tempfile
        >>> args = argparse.Namespace(out=tempfile.mkdtemp(), overwrite=False)
        >>> prepare_out(args, "ioi")
        []
    """
    if args.out is None:
        args.out = default_out(args, command)
    check_out_dir(args.out)
    out = Path(args.out)
    check_writable(out)
    earlier = earlier_run_files(out)
    if earlier and not args.overwrite:
        shown = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise CLIError(f"--out {out} holds the results of another run ({shown}); pass --overwrite to "
                       "replace them, or choose another --out")
    return earlier


def write_manifest(folder: Path, args: argparse.Namespace, command: str, names: list) -> Path:
    """Write ``captum-relp-run.json`` into ``folder``: the command, its settings and the run's files
    (``names``). Settings are ``args`` as given (``--out`` the user's path, wherever the files are staged).

    Example:
        >>> import tempfile
        >>> args = argparse.Namespace(out="results", model="m", seed=0, overwrite=True, func=None)
        >>> path = write_manifest(Path(tempfile.mkdtemp()), args, "edges", ["edges_results.json"])
        >>> import json; manifest = json.loads(path.read_text())
        >>> manifest["command"], manifest["settings"]["out"], manifest["files"]
        ('edges', 'results', ['edges_results.json'])
    """
    import json

    from .. import __version__

    plain = (str, int, float, bool, type(None))
    settings = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, plain)}
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps({"command": command, "version": __version__, "settings": settings,
                                "files": list(names)}, indent=2))
    return path


def parse_fractions(text: Optional[str]) -> Optional[list]:
    """``--fractions``: finite numbers increasing from 0 to 1 (checked before any work); None stays None.

    Example:
        >>> parse_fractions("0,0.5,1")
        [0.0, 0.5, 1.0]
        >>> parse_fractions("0,nan,1")
        Traceback (most recent call last):
        ...
        captum_relp.cli._common.CLIError: --fractions takes numbers in [0, 1], got 'nan'
    """
    import math

    if not text:
        return None
    try:
        fractions = [float(f) for f in text.split(",")]
    except ValueError as error:
        raise CLIError(f"--fractions takes comma-separated numbers, got {text!r}") from error
    bad = [item.strip() for item, f in zip(text.split(","), fractions) if not (math.isfinite(f) and 0.0 <= f <= 1.0)]
    if bad:
        raise CLIError(f"--fractions takes numbers in [0, 1], got {', '.join(map(repr, bad))}")
    if fractions[0] != 0.0 or fractions[-1] != 1.0 or sorted(fractions) != fractions:
        raise CLIError(f"--fractions must increase from 0 to 1, got {text!r}")
    return fractions


def report_written(written: list, removed: list) -> None:
    """Print the files a run wrote and the earlier run's files it removed (``--overwrite``).

    Example:
        >>> report_written([Path("out/a.json")], [Path("out/b.png")])
        <BLANKLINE>
        wrote out/a.json
        removed the earlier run's out/b.png
    """
    print("\nwrote " + ", ".join(str(p) for p in written))
    if removed:
        print("removed the earlier run's " + ", ".join(str(p) for p in removed))
