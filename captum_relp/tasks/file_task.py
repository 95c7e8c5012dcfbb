"""Contrastive pairs from a file: ``.csv`` or ``.jsonl`` rows with a clean and a corrupted prompt.

Every row has the fields ``clean`` and ``corrupted`` (strings) and one of three kinds of answer:

* **token ids**, EAP-IG's layout: ``correct_idx`` and ``incorrect_idx``, each an int or a JSON
  list of ints (a list is a set of alternative answers);
* **strings**: ``answer`` and ``foil``; each is appended to the prompt as written (a space is put
  between them when neither the prompt ends nor the answer starts with whitespace). Both may be
  given next to ids; they must then encode to the same tokens;
* **greater-than**, EAP-IG's layout: ``label``, the last two digits of the start year; the answer
  is every year above the label, the foil every year at or below it.

A bad row (a missing field, an empty prompt, an id that is not an int) raises a ``ValueError``
naming the file, the line and the field; so does a file that cannot be read. Ids are checked
against the vocabulary when the pairs are encoded (:func:`~captum_relp.tasks.file_encode.encode_task`).

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pairs.csv"
    >>> _ = path.write_text('clean,corrupted,correct_idx,incorrect_idx\\n"a b","c b",5,"[6, 7]"\\n')
    >>> task = load_task_file(path)
    >>> task.kind, task.pairs[0].correct_ids, task.pairs[0].incorrect_ids, task.pairs[0].line
    ('ids', (5,), (6, 7), 2)
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

KINDS = ("ids", "strings", "greater-than")
"""The kinds of answer a task file can give (see the module docstring)."""

ID_FIELDS = ("correct_idx", "incorrect_idx")
STRING_FIELDS = ("answer", "foil")


@dataclass(frozen=True)
class TaskPair:
    """One row of a task file.

    Attributes:
        clean: the clean prompt.
        corrupted: the corrupted prompt.
        correct_ids: the answer's token ids given in the file (a set of alternatives), or ``None``.
        incorrect_ids: the foil's token ids given in the file, or ``None``.
        answer: the answer string given in the file, or ``None``.
        foil: the foil string given in the file, or ``None``.
        label: the greater-than label (0 to 99), or ``None``.
        line: the row's line in the file (1-based; a CSV header is line 1).
        source: the file.

    Example:
        >>> TaskPair("a", "b", answer=" x", foil=" y").where("answer")
        '<memory>, line 0, field answer'
    """

    clean: str
    corrupted: str
    correct_ids: Optional[Tuple[int, ...]] = None
    incorrect_ids: Optional[Tuple[int, ...]] = None
    answer: Optional[str] = None
    foil: Optional[str] = None
    label: Optional[int] = None
    line: int = 0
    source: str = "<memory>"

    def where(self, field: str) -> str:
        """``FILE, line N, field F``: the start of every error about this row."""
        return f"{self.source}, line {self.line}, field {field}"

    def to_json(self) -> Dict[str, Any]:
        """The row as plain data (saved with a run's results as the pairs used)."""
        names = {"correct_ids": "correct_idx", "incorrect_ids": "incorrect_idx"}
        out = {names.get(k, k): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None and k != "source"}


@dataclass
class TaskFile:
    """The pairs of a task file and the kind of answer they give (one of ``KINDS``: ``"ids"``, ``"strings"``, ``"greater-than"``).

    Example:
        >>> TaskFile([TaskPair("a", "b", label=5)], "greater-than", "x.csv").name
        'x'
    """

    pairs: List[TaskPair]
    kind: str
    path: str

    @property
    def name(self) -> str:
        """The file's name without suffix (used in output folder names)."""
        return Path(self.path).stem

    def __len__(self) -> int:
        return len(self.pairs)


def _rows(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line, row)`` of a ``.csv`` (header first) or ``.jsonl`` file (blank lines skipped)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: a task file is a .csv or .jsonl file, got {suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the task file: {error}") from error
    if suffix == ".jsonl":
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object: {error.msg}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: not a JSON object")
            yield number, row
        return
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise ValueError(f"{path}, line 1: the CSV file has no header")
    start = 2
    for row in reader:
        if None in row:
            raise ValueError(f"{path}, line {start}: more values than the header has fields")
        yield start, row
        start = reader.line_num + 1


def _ids(value: Any, where: str) -> Tuple[int, ...]:
    """An int, a JSON list of ints or a string holding either -> a non-empty tuple of ids >= 0."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: expected a token id or a JSON list of ids, got {value!r}") from error
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"{where}: expected a token id or a non-empty list of ids >= 0, got {value!r}")
    return tuple(items)


def _text(row: Dict[str, Any], field: str, where: str, required: bool) -> Optional[str]:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            raise ValueError(f"{where}: missing")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if not value.strip():
        raise ValueError(f"{where}: empty")
    return value


def _label(value: Any, where: str) -> int:
    try:
        label = int(str(value).strip())
    except ValueError as error:
        raise ValueError(f"{where}: expected the start year's last two digits (0 to 99), got {value!r}") from error
    if not 0 <= label <= 99:
        raise ValueError(f"{where}: expected the start year's last two digits (0 to 99), got {value!r}")
    return label


def _kind(fields: set, source: str, line: int) -> str:
    if "label" in fields:
        return "greater-than"
    if any(f in fields for f in ID_FIELDS):
        return "ids"
    if any(f in fields for f in STRING_FIELDS):
        return "strings"
    raise ValueError(f"{source}, line {line}: no answer: give correct_idx and incorrect_idx (token ids), "
                     "answer and foil (strings), or label (greater-than)")


def _pair(row: Dict[str, Any], line: int, source: str, kind: str) -> TaskPair:
    where = f"{source}, line {line}, field"
    clean = _text(row, "clean", f"{where} clean", True)
    corrupted = _text(row, "corrupted", f"{where} corrupted", True)
    values: Dict[str, Any] = {}
    if kind == "greater-than":
        if row.get("label") in (None, ""):
            raise ValueError(f"{where} label: missing")
        values["label"] = _label(row["label"], f"{where} label")
    for field, name in zip(ID_FIELDS, ("correct_ids", "incorrect_ids")):
        if row.get(field) not in (None, ""):
            values[name] = _ids(row[field], f"{where} {field}")
        elif kind == "ids":
            raise ValueError(f"{where} {field}: missing")
    for field in STRING_FIELDS:
        text = row.get(field)
        if text not in (None, ""):
            values[field] = _text(row, field, f"{where} {field}", True)
        elif kind == "strings":
            raise ValueError(f"{where} {field}: missing")
    return TaskPair(clean, corrupted, line=line, source=source, **values)  # type: ignore[arg-type]


def load_task_file(path: Union[str, Path], limit: Optional[int] = None) -> TaskFile:
    """Read and check the pairs of a task file (see the module docstring for the layout).

    Args:
        path: a ``.csv`` or ``.jsonl`` file.
        limit: read only the first ``limit`` rows (all when ``None``).

    Returns:
        TaskFile

    Raises:
        ValueError: naming the file, the line and the field of the first bad row; or the file
            when it cannot be read, has no rows or mixes kinds of answer.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "years.jsonl"
        >>> _ = path.write_text('{"clean": "from 1352 to 13", "corrupted": "from 1301 to 13", "label": 52}\\n'
        ...                     '{"clean": "from 1410 to 14", "corrupted": "", "label": 10}\\n')
        >>> load_task_file(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../years.jsonl, line 2, field corrupted: empty
    """
    path = Path(path)
    pairs: List[TaskPair] = []
    kind: Optional[str] = None
    for line, row in _rows(path):
        row_kind = _kind(set(k for k, v in row.items() if v not in (None, "")), str(path), line)
        if kind is None:
            kind = row_kind
        elif row_kind != kind:
            raise ValueError(f"{path}, line {line}: this row gives {row_kind} answers, earlier rows {kind}")
        pairs.append(_pair(row, line, str(path), kind))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs or kind is None:
        raise ValueError(f"{path}: the task file has no rows")
    return TaskFile(pairs, kind, str(path))


def save_pairs(pairs: List[TaskPair], path: Union[str, Path]) -> Path:
    """Write ``pairs`` as JSONL (one row per line; the file can be loaded again).

    Example:
        >>> import pathlib, tempfile
        >>> out = save_pairs([TaskPair("a b", "c b", answer=" x", foil=" y", line=2)],
        ...                  pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl")
        >>> load_task_file(out).pairs[0].answer
        ' x'
    """
    path = Path(path)
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs), encoding="utf-8")
    return path


__all__ = ["KINDS", "TaskPair", "TaskFile", "load_task_file", "save_pairs"]
