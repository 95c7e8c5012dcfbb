"""Which fields of the shipped results JSONs a test accounts for: by name, as recomputed or as listed.

Patterns are ``"<results JSON glob>#<field path glob>"`` (the part after ``#`` optional); field
paths join the keys from the JSON's root with ``/`` (list indices dropped).
"""
import fnmatch
import json
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "_static" / "results"


def fields_named(data, name: str, path: Tuple[str, ...] = ()) -> Iterator[str]:
    """Paths of every field of ``data`` whose key matches the regular expression ``name``."""
    if isinstance(data, dict):
        for key, value in data.items():
            if re.search(name, str(key)):
                yield "/".join(path + (str(key),))
            else:
                yield from fields_named(value, name, path + (str(key),))
    elif isinstance(data, list):
        for value in data:
            yield from fields_named(value, name, path)


def matches(patterns: Iterable[str], name: str, field: str) -> bool:
    """Whether the field ``field`` of the results JSON ``name`` matches one of ``patterns``."""
    for pattern in patterns:
        where, _, what = pattern.partition("#")
        if fnmatch.fnmatch(name, where) and (not what or fnmatch.fnmatch(field, what)):
            return True
    return False


def assert_every_field_accounted_for(name: str, recomputed: Iterable[str], listed: Dict[str, object]) -> None:
    """Every field named ``name`` in every results JSON is matched by ``recomputed`` or ``listed``
    (never both), and every pattern matches some field (no stale entry)."""
    recomputed = list(recomputed)
    fields: List[Tuple[str, str]] = [(str(p.relative_to(RESULTS)), field) for p in sorted(RESULTS.rglob("*.json"))
                                     for field in fields_named(json.loads(p.read_text()), name)]
    assert len(fields) > 100
    unaccounted = [f for f in fields if not matches(recomputed, *f) and not matches(listed, *f)]
    assert not unaccounted, unaccounted
    both = [f for f in fields if matches(recomputed, *f) and matches(listed, *f)]
    assert not both, both
    for pattern in (*recomputed, *listed):
        assert any(matches([pattern], *f) for f in fields), pattern
