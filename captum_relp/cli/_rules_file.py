"""``--rules PATH.json``: rules calibrated by an earlier ``--rules calibrated`` run, read back.

The file is read and validated before the model loads, and checked against the model once it
has loaded; every failure is a usage error (exit code 2) naming ``--rules`` and the path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from ._common import CLIError

RULE_CHOICES = ("preset", "calibrated")
"""``--rules`` of ``circuit`` and ``edges``, besides a calibration file (``.json``)."""


def is_rules_file(value: str) -> bool:
    """Whether a ``--rules`` item names a calibration file (it ends in ``.json``).

    Example:
        >>> is_rules_file("out/ioi_calibration.json"), is_rules_file("calibrated")
        (True, False)
    """
    return value.strip().lower().endswith(".json")


def read_rules_file(path: str) -> Any:
    """The :class:`~captum_relp.CalibratedRules` saved in ``path``, validated (before the model loads).

    Example:
        >>> read_rules_file("no-such-file.json")
        Traceback (most recent call last):
        ...
        captum_relp.cli._common.CLIError: --rules no-such-file.json: no such file
    """
    from ..calibration import CalibratedRules

    file = Path(path)
    if not file.exists():
        raise CLIError(f"--rules {path}: no such file")
    if not file.is_file():
        raise CLIError(f"--rules {path}: not a file")
    try:
        return CalibratedRules.load(file)
    except OSError as error:
        raise CLIError(f"--rules {path}: cannot be read: {error.strerror or error}") from error
    except ValueError as error:  # not JSON, or a field that is not a calibration file's
        raise CLIError(f"--rules {path}: not a calibration file this captum-relp can read: "
                       f"{error.__cause__ or error}") from error


def check_rules_file(rules: Any, path: str, model: Any, name: Optional[str] = None) -> None:
    """Raise a usage error naming ``--rules`` if ``rules`` were calibrated on another kind of model
    (:meth:`~captum_relp.CalibratedRules.check_model`: the model's class and ruled module types);
    say on stderr when the file names another model of the same kind."""
    try:
        rules.check_model(model)
    except ValueError as error:
        raise CLIError(f"--rules {path}: calibrated for another model: {error}") from error
    saved = rules.info.get("model")
    if name is not None and saved is not None and saved != name:
        print(f"captum-relp: note: --rules {path} was calibrated on {saved}; this run uses {name} "
              "(the same kind of model, so the rules apply)", file=sys.stderr)


def parse_rule_list(text: str, presets: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """``--rules`` of ``attribute`` and ``ioi``: the rule sets, a calibration file standing for
    ``calibrated``, and that file's path (``None`` without one).

    Example:
        >>> parse_rule_list("relp,runs/ioi_calibration.json", ("relp", "relp-ah", "calibrated"))
        (['relp', 'calibrated'], 'runs/ioi_calibration.json')
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    files = [item for item in items if is_rules_file(item)]
    if not items or any(item not in presets for item in items if not is_rules_file(item)):
        raise CLIError(f"--rules takes a comma-separated list of {list(presets)} and at most one calibration "
                       f"file (.json), got {text!r}")
    if len(files) > 1 or (files and "calibrated" in items):
        raise CLIError(f"--rules takes one source of calibrated rules (calibrated, or one .json file), got {text!r}")
    return [("calibrated" if is_rules_file(i) else i) for i in items], (files[0] if files else None)


def parse_rules_choice(args: argparse.Namespace) -> Optional[str]:
    """``--rules`` of ``circuit`` and ``edges``: ``preset``, ``calibrated`` or a ``.json`` file
    (returned; ``None`` otherwise).

    Example:
        >>> parse_rules_choice(argparse.Namespace(rules="calibrated")) is None
        True
        >>> parse_rules_choice(argparse.Namespace(rules="magic"))
        Traceback (most recent call last):
        ...
        captum_relp.cli._common.CLIError: --rules takes preset, calibrated or a calibration file (.json), got 'magic'
    """
    if is_rules_file(args.rules):
        return args.rules.strip()
    if args.rules not in RULE_CHOICES:
        raise CLIError(f"--rules takes {', '.join(RULE_CHOICES)} or a calibration file (.json), got {args.rules!r}")
    return None
