"""What an experiment records of the rules it calibrated or reused.

A run with calibrated rules keeps the :class:`~captum_relp.CalibratedRules` it used and
saves it next to its results (the command line: ``--rules calibrated``); the file's ``info``
holds the calibration pairs (their prompts, and for task-file rows their line numbers) and the
model's name, so that a later run can reuse the file (``--rules PATH.json``) and a reader can see
what it was calibrated on. The results JSON names the file in its calibration entry.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

from torch import nn

from ..calibration import CalibratedRules, CalibrationWarning, calibrate_on_batch
from ..models import COMPONENT_KINDS


def calibration_pairs(pairs: Optional[Sequence[Any]] = None, batch: Any = None,
                      tokenizer: Any = None) -> List[Dict[str, Any]]:
    """The calibration pairs as JSON-ready rows ``{"clean", "corrupt"}`` (``"line"`` too for task-file rows).

    ``pairs``: :class:`~captum_relp.tasks.file_task.TaskPair` rows (``clean``, ``corrupted``,
    ``line``) or generated pairs (``clean_prompt``, ``corrupt_prompt``). Without ``pairs``, the
    prompts of ``batch`` are decoded with ``tokenizer`` (real tokens only, special tokens skipped).

    Args:
        pairs (sequence, optional): the pairs, when the caller has them.
        batch (optional): a tokenized batch (``clean_ids``, ``corrupt_ids``, ``attention_mask``).
        tokenizer (optional): the tokenizer that encoded ``batch``.

    Returns:
        list of dict

    Examples::

        >>> from captum_relp.tasks.file_task import TaskPair
        >>> calibration_pairs([TaskPair("The capital of France is", "The capital of Spain is", line=3)])
        [{'line': 3, 'clean': 'The capital of France is', 'corrupt': 'The capital of Spain is'}]
        >>> from captum_relp.embedded import load_embedded
        >>> from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs
        >>> _, tok = load_embedded("tiny-gpt2-ioi")
        >>> pair = generate_ioi_pairs(1, seed=3, tokenizer=tok)[0]
        >>> row = calibration_pairs(batch=encode_ioi([pair], tok), tokenizer=tok)[0]
        >>> row == {"clean": pair.clean_prompt, "corrupt": pair.corrupt_prompt}
        True
    """
    if pairs is not None:
        rows = []
        for pair in pairs:
            if hasattr(pair, "corrupted"):
                rows.append({"line": pair.line, "clean": pair.clean, "corrupt": pair.corrupted})
            else:
                rows.append({"clean": pair.clean_prompt, "corrupt": pair.corrupt_prompt})
        return rows
    if batch is None or tokenizer is None:
        raise ValueError("calibration_pairs needs pairs, or a batch and its tokenizer")
    lengths = batch.attention_mask.sum(1).tolist()
    decode = lambda ids, n: tokenizer.decode(ids[: int(n)], skip_special_tokens=True)  # noqa: E731
    return [{"clean": decode(c, n), "corrupt": decode(k, n)}
            for c, k, n in zip(batch.clean_ids.tolist(), batch.corrupt_ids.tolist(), lengths)]


def record_calibration(rules: CalibratedRules, pairs: List[Dict[str, Any]], model: str,
                       **info: Any) -> CalibratedRules:
    """Write the calibration pairs, the model's name and ``info`` into ``rules.info`` (returns ``rules``).

    Args:
        rules (CalibratedRules): the rules just calibrated.
        pairs (list of dict): :func:`calibration_pairs`.
        model (str): the model's name.
        **info: more JSON-ready notes (e.g. the task file or the seed of generated pairs).

    Returns:
        CalibratedRules

    Examples::

        >>> from captum_relp import RuleSet
        >>> cal = CalibratedRules({"relp": RuleSet("relp")}, {"mlp": "relp"}, {}, ["mlp"])
        >>> record_calibration(cal, [{"clean": "a", "corrupt": "b"}], "tiny-gpt2-ioi", seed=1).info["model"]
        'tiny-gpt2-ioi'
    """
    rules.info.update({"model": model, "calibration_pairs": pairs, **info})
    return rules


class CalibrationFailed(ValueError):
    """The calibration of a run could not be made (e.g. its pairs have no effect); the message
    names the calibration pairs and the cause."""


def calibrate_run(model: nn.Module, batch: Any, where: str, default: Optional[str] = None,
                  kinds: Sequence[str] = COMPONENT_KINDS) -> CalibratedRules:
    """:func:`~captum_relp.calibration.calibrate_on_batch` for an experiment: the rules per
    component kind, each kind keeping ``default`` (``None``: the best fixed preset) unless a
    candidate beats it beyond the noise. A failure is a :class:`CalibrationFailed` naming ``where``.

    Args:
        model (nn.Module): a Hugging Face causal LM.
        batch: the calibration pairs, tokenized (clean/corrupt ids, ``attention_mask``, ``metric()``).
        where (str): the calibration pairs in words, for the error message.
        default (str, optional): ``best-preset``, ``gradient``, ``relp``, ``relp-ah`` or another candidate.
        kinds (sequence of str): the component kinds calibrated.

    Returns:
        CalibratedRules

    Examples::

        >>> import warnings
        >>> from captum_relp.embedded import load_embedded
        >>> from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> batch = encode_ioi(generate_ioi_pairs(3, seed=5, tokenizer=tok), tok)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # 3 pairs may leave a group undecided
        ...     calibrate_run(model, batch, "3 IOI pairs", default="gradient").default
        'gradient'
        >>> from dataclasses import replace
        >>> calibrate_run(model, replace(batch, corrupt_ids=batch.clean_ids), "3 IOI pairs")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        captum_relp.experiments.calibration_record.CalibrationFailed: cannot calibrate on 3 IOI pairs: ... no effect to calibrate on
    """
    with calibrating(where):
        return calibrate_on_batch(model, batch, kinds, default=default)


@contextmanager
def calibrating(where: str) -> Iterator[None]:
    """The calibration step of an experiment: a failure (``ValueError``) becomes a
    :class:`CalibrationFailed` naming ``where``; undecided groups are not warned about again,
    since the rules' ``summary()``, printed and saved with the results, holds their notes.

    Example:
        >>> with calibrating("3 pairs"):
        ...     raise ValueError("no effect")
        Traceback (most recent call last):
        ...
        captum_relp.experiments.calibration_record.CalibrationFailed: cannot calibrate on 3 pairs: no effect
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            yield
    except ValueError as error:
        raise CalibrationFailed(f"cannot calibrate on {where}: {error}") from error


def calibration_entry(rules: CalibratedRules, file: Optional[str], seconds: Optional[float] = None,
                      loaded: bool = False) -> Dict[str, Any]:
    """The calibration entry of a results JSON: the choices, the summary, the number of pairs,
    the file the rules are saved in (``loaded``: the file they were read from) and the time spent.

    Args:
        rules (CalibratedRules): the rules used.
        file (str, optional): the calibration file: written by this run, or read (``loaded``).
        seconds (float, optional): time spent calibrating (``None`` when loaded).
        loaded (bool): the rules come from a file, no calibration was run.

    Returns:
        dict

    Examples::

        >>> from captum_relp import RuleSet
        >>> cal = CalibratedRules({"relp": RuleSet("relp")}, {"mlp": "relp"}, {}, ["mlp"], n_examples=4)
        >>> entry = calibration_entry(cal, "ioi_calibration.json", seconds=1.5)
        >>> entry["file"], entry["n_prompts"], entry["loaded"]
        ('ioi_calibration.json', 4, False)
    """
    return {"choices": dict(rules.choices), "default": rules.default, "n_prompts": rules.n_examples, "seconds": seconds,
            "summary": rules.summary(), "file": file, "loaded": loaded}


def describe_calibration(entry: Dict[str, Any], what: str = "separate pairs", title: str = "calibrated rules") -> str:
    """The heading of a printed calibration entry: where the rules come from and what they cost.

    Args:
        entry (dict): :func:`calibration_entry`.
        what (str): what the calibration pairs are.
        title (str): the heading's first words.

    Returns:
        str

    Examples::

        >>> describe_calibration({"n_prompts": 3, "seconds": 2.0, "loaded": False, "file": "x.json"})
        'calibrated rules (3 separate pairs, 2.0 s, saved as x.json)'
        >>> print(describe_calibration({"n_prompts": 3, "seconds": None, "loaded": True, "file": "x.json"}))
        ... # doctest: +NORMALIZE_WHITESPACE
        calibrated rules (read from x.json, calibrated on 3 pairs; no calibration run: the cost below is
        that of the earlier run)
    """
    if entry.get("loaded"):
        source = entry.get("file") or "rules given to the run"
        return (f"{title} (read from {source}, calibrated on {entry['n_prompts']} pairs; no calibration run: "
                "the cost below is that of the earlier run)")
    seconds = f", {entry['seconds']:.1f} s" if entry.get("seconds") is not None else ""
    return f"{title} ({entry['n_prompts']} {what}{seconds}, saved as {entry['file']})"


__all__ = ["calibration_pairs", "record_calibration", "calibrate_run", "calibrating", "CalibrationFailed",
           "calibration_entry",
           "describe_calibration"]
