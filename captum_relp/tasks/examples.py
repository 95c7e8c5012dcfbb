"""Two small example task files shipped with the package, and the code that writes them.

* ``capitals.jsonl``: "The capital of France is" -> `` Paris`` against the capital of the
  country of the corrupted prompt; answers as strings (``answer``, ``foil``), so the file
  suits any tokenizer (a capital that is several tokens needs the ``logprob`` metric).
* ``greater_than.csv``: EAP-IG's greater-than layout (``clean``, ``corrupted``, ``label``):
  "The war lasted from the year 1352 to the year 13" against the start year ``1301``;
  the metric is the probability of the years above 52 minus those at or below it.

Both are generated with a fixed seed by :func:`write_examples` (a test checks that the
shipped files are what it writes).

Example:
    >>> from captum_relp.tasks.file_task import load_task_file
    >>> task = load_task_file(example_path("greater_than"))
    >>> task.kind, len(task), task.pairs[0].clean.split(" to ")[1][:8]
    ('greater-than', 32, 'the year')
"""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Dict, List

DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = {"capitals": "capitals.jsonl", "greater_than": "greater_than.csv"}
"""Example name -> file name in ``captum_relp/tasks/data``."""

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("England", "London"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"),
    ("Poland", "Warsaw"), ("China", "Beijing"), ("Norway", "Oslo"), ("Cuba", "Havana"),
)
NOUNS = ("war", "siege", "voyage", "expedition", "drought", "reign", "trial", "journey",
         "famine", "strike", "dynasty", "campaign", "rebellion", "occupation", "crisis", "festival")


def example_path(name: str) -> Path:
    """The shipped file of example ``name`` (a key of :data:`EXAMPLES`).

    Example:
        >>> example_path("capitals").name
        'capitals.jsonl'
    """
    if name not in EXAMPLES:
        raise ValueError(f"example must be one of {sorted(EXAMPLES)}, got {name!r}")
    return DATA / EXAMPLES[name]


def capitals_rows(seed: int = 0) -> List[Dict[str, str]]:
    """Every country against a different one (chosen with ``seed``), answers as strings.

    Example:
        >>> capitals_rows()[0]["clean"]
        'The capital of France is'
    """
    rng = random.Random(seed)
    rows = []
    for i, (country, capital) in enumerate(CAPITALS):
        other, foil = CAPITALS[(i + rng.randrange(1, len(CAPITALS))) % len(CAPITALS)]
        rows.append({"clean": f"The capital of {country} is", "corrupted": f"The capital of {other} is",
                     "answer": f" {capital}", "foil": f" {foil}"})
    return rows


def greater_than_rows(n: int = 32, seed: int = 0) -> List[Dict[str, object]]:
    """``n`` greater-than rows in EAP-IG's layout: centuries 11-17, labels 02-98, corrupted year XX01.

    Example:
        >>> row = greater_than_rows(1)[0]
        >>> row["clean"].endswith(row["clean"].split()[-1]) and row["corrupted"].split()[6].endswith("01")
        True
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun, century, label = rng.choice(NOUNS), rng.randint(11, 17), rng.randint(2, 98)
        text = "The {} lasted from the year {}{:02d} to the year {}"
        rows.append({"clean": text.format(noun, century, label, century),
                     "corrupted": text.format(noun, century, 1, century), "label": label})
    return rows


def _texts() -> Dict[str, str]:
    capitals = "".join(json.dumps(row) + "\n" for row in capitals_rows())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["clean", "corrupted", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(greater_than_rows())
    return {"capitals": capitals, "greater_than": buffer.getvalue()}


def write_examples(folder: Path = DATA) -> List[Path]:
    """Write the example files into ``folder`` (default: the package's data folder).

    Example:
        >>> import tempfile
        >>> [p.name for p in write_examples(Path(tempfile.mkdtemp()))]
        ['capitals.jsonl', 'greater_than.csv']
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in _texts().items():
        path = folder / EXAMPLES[name]
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


__all__ = ["EXAMPLES", "CAPITALS", "NOUNS", "example_path", "capitals_rows", "greater_than_rows", "write_examples"]
