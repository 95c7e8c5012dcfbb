"""Indirect Object Identification (IOI) task: prompt generation, encoding, metric.

The three templates follow Table 2 of the RelP paper (Jafari et al., 2025)::

    Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A].
    When, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A].
    After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A].

``A`` is the indirect object (IO) and ``B`` the subject (S). The prompt stops
before the final `` [A].``; the model should predict ``A``. The corrupted
(patch) prompt swaps ``A`` and ``B`` everywhere, so clean and corrupted
prompts align token by token.

Example:
    >>> pairs = generate_ioi_pairs(2, seed=0)
    >>> pairs[0].clean_prompt.endswith(" to")
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from captum_relp.metrics import LogitDiff
from captum_relp.tasks._pairs import (  # noqa: F401  (public here)
    PairBatch,
    is_single_token,
    single_token_words,
    tokenize_aligned,
    word_ids,
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate",
    "Lisa", "Mark", "Anna", "David", "Sarah", "Michael", "Laura", "Peter", "Emma", "George",
    "Alice", "Robert", "Linda", "Steven", "Susan", "Kevin", "Karen", "Brian", "Nancy", "Jason",
    "Helen", "Eric", "Rachel", "Adam", "Julia", "Ryan", "Grace", "Jacob", "Rose", "Frank",
    "Claire", "Henry", "Lucy", "Jack", "Ruth", "Sam", "Jane", "Tim", "Kelly", "Scott",
    "Diana", "Carl", "Ellen", "Ben", "Megan", "Luke", "Amanda", "Chris", "Emily", "Andrew",
    "Victoria", "Roger", "Maria", "Alex", "Sophie", "Simon", "Olivia", "Joe", "Hannah", "Patrick",
)
"""Common English first names (single tokens for GPT-2 style tokenizers)."""

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
    "park", "beach", "library", "market", "church", "museum", "airport", "cafe",
)
"""Places used in the ``[PLACE]`` slot."""

OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
    "book", "letter", "flower", "ball", "gift", "key", "hat", "apple",
)
"""Objects used in the ``[OBJECT]`` slot."""

TEMPLATES: tuple[str, ...] = (
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "When, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
)
"""Prompt templates (the full sentence ends with `` {A}.``)."""


@dataclass
class IOIPair:
    """A clean/corrupted IOI prompt pair.

    Example:
        >>> p = generate_ioi_pairs(1, seed=3)[0]
        >>> p.corrupt_prompt == p.clean_prompt.replace(p.io_name, "#").replace(
        ...     p.s_name, p.io_name).replace("#", p.s_name)
        True
    """

    clean_prompt: str
    corrupt_prompt: str
    io_name: str
    s_name: str
    template_id: int
    place: str
    obj: str

    @property
    def clean_sentence(self) -> str:
        """The full clean sentence, including the answer (`` IO.``)."""
        return f"{self.clean_prompt} {self.io_name}."


def _fill(template_id: int, a: str, b: str, place: str, obj: str) -> str:
    return TEMPLATES[template_id].format(A=a, B=b, PLACE=place, OBJECT=obj)


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def generate_ioi_pairs(
    n: int,
    seed: int = 0,
    names: Sequence[str] | None = None,
    templates: Sequence[int] = (0, 1, 2),
    tokenizer: Any = None,
    places: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
) -> list[IOIPair]:
    """Generate ``n`` deterministic clean/corrupted IOI prompt pairs.

    Args:
        n: Number of pairs.
        seed: Random seed; the same seed always gives the same pairs.
        names: Candidate names (default :data:`NAMES`).
        templates: Indices into :data:`TEMPLATES` (cycled in order).
        tokenizer: Optional HF tokenizer. If given, only names that encode
            (with a leading space) to one token are used, and every pair is
            checked to tokenize clean and corrupted prompts to equal length.
        places: Candidate places (default :data:`PLACES`).
        objects: Candidate objects (default :data:`OBJECTS`).

    Returns:
        List of :class:`IOIPair`.

    Raises:
        ValueError: If fewer than two usable names remain.

    Example:
        >>> a = generate_ioi_pairs(5, seed=1)
        >>> a == generate_ioi_pairs(5, seed=1)
        True
        >>> a[0].template_id, a[1].template_id
        (0, 1)
    """
    names = list(NAMES if names is None else names)
    names = single_token_words(names, tokenizer)
    if len(names) < 2:
        raise ValueError(
            f"IOI needs at least 2 single-token names, got {len(names)} "
            f"(names that are not a single token for the tokenizer are dropped)."
        )
    templates = list(templates)
    if not templates or any(t not in range(len(TEMPLATES)) for t in templates):
        raise ValueError(f"templates must be a non-empty subset of 0..{len(TEMPLATES) - 1}")
    places = list(PLACES if places is None else places)
    objects = list(OBJECTS if objects is None else objects)
    rng = random.Random(seed)
    pairs: list[IOIPair] = []
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 100 * max(n, 1):
            raise ValueError("could not generate aligned IOI pairs for this tokenizer")
        t = templates[len(pairs) % len(templates)]
        a, b = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        clean, corrupt = _fill(t, a, b, place, obj), _fill(t, b, a, place, obj)
        if tokenizer is not None and _n_tokens(tokenizer, clean) != _n_tokens(tokenizer, corrupt):
            continue
        pairs.append(IOIPair(clean, corrupt, a, b, t, place, obj))
    return pairs


_SLOT = re.compile(r"\{(A|B|PLACE|OBJECT)\}")


def _slot_spans(pair: IOIPair) -> tuple[str, list[tuple[str, int, int]]]:
    """The clean prompt and ``(role, start, end)`` character spans of its slots, in order."""
    template, text, spans, at = TEMPLATES[pair.template_id], "", [], 0
    fill = {"A": pair.io_name, "B": pair.s_name, "PLACE": pair.place, "OBJECT": pair.obj}
    for match in _SLOT.finditer(template):
        text += template[at : match.start()]
        slot = match.group(1)
        role = {"A": "IO", "PLACE": "PLACE", "OBJECT": "OBJECT"}.get(slot) or (
            "S1" if not any(r == "S1" for r, _, _ in spans) else "S2")
        spans.append((role, len(text), len(text) + len(fill[slot])))
        text += fill[slot]
        at = match.end()
    return text + template[at:], spans


def _token_spans(tokenizer: Any, ids: Sequence[int], special: set) -> list[tuple[int, int]]:
    """Character span of each token, by decoding growing prefixes (exact for any tokenizer)."""
    spans, end, kept = [], 0, []
    for token in ids:
        if token in special:
            spans.append((end, end))
            continue
        kept.append(token)
        new_end = len(tokenizer.decode(kept))
        spans.append((end, new_end))
        end = new_end
    return spans


def ioi_token_roles(pair: IOIPair, tokenizer: Any) -> list[str]:
    """The role of every token of ``pair.clean_prompt``, so that templates can be aligned.

    Slot tokens are ``S1`` (first subject), ``IO``, ``PLACE``, ``S2`` (second subject)
    and ``OBJECT`` (``PLACE+1`` ... for a word split into several tokens); the last token
    is ``END``; special tokens keep their text (``<bos>``); any other token is named by
    the slot it follows and its index after it (``START:0`` is the template's first
    word, ``PLACE:0`` the punctuation after the place). Two prompts of different
    templates share a role exactly where they play the same part in the sentence.

    Args:
        pair: an IOI pair.
        tokenizer: the tokenizer that encodes the prompt (as ``tokenizer(prompt)``).

    Returns:
        One role per token of ``tokenizer(pair.clean_prompt)["input_ids"]``.

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> _, tok = load_embedded("tiny-gpt2-ioi")
        >>> then, after = generate_ioi_pairs(3, tokenizer=tok)[::2]
        >>> ioi_token_roles(then, tok)[:6]
        ['<bos>', 'START:0', 'START:1', 'S1', 'S1:0', 'IO']
        >>> ioi_token_roles(after, tok)[:5]
        ['<bos>', 'START:0', 'S1', 'S1:0', 'IO']
    """
    text, slots = _slot_spans(pair)
    if text != pair.clean_prompt:
        raise ValueError("pair.clean_prompt does not follow its template")
    ids = tokenizer(text)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    spans = _token_spans(tokenizer, ids, special)
    roles, previous, counts = [], "START", {}
    for index, (token, (start, end)) in enumerate(zip(ids, spans)):
        if token in special:
            roles.append(tokenizer.convert_ids_to_tokens(token))
            continue
        slot = next((r for r, s, e in slots if start < e and end > s), None)
        if index == len(ids) - 1:
            role = "END"
        elif slot is not None:
            role = slot if counts.get(slot, 0) == 0 else f"{slot}+{counts[slot]}"
            counts[slot] = counts.get(slot, 0) + 1
            previous = slot
        else:
            key = f"{previous}:"
            role = f"{key}{counts.get(key, 0)}"
            counts[key] = counts.get(key, 0) + 1
        roles.append(role)
    return roles


@dataclass
class IOIBatch(PairBatch):
    """Tokenized IOI pairs (right-padded).

    Attributes:
        clean_ids: ``[N, T]`` clean prompt ids.
        corrupt_ids: ``[N, T]`` corrupted prompt ids (same positions as clean).
        attention_mask: ``[N, T]`` 1 for real tokens, 0 for padding.
        last_pos: ``[N]`` index of the final real token of each row.
        io_ids: ``[N]`` token id of `` IO`` (the correct answer).
        s_ids: ``[N]`` token id of `` S`` (the distractor).
        positions: Token strings of the first clean prompt (plot labels).

    Example:
        >>> b = IOIBatch(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
        ...              torch.ones(1, 2, dtype=torch.long), torch.tensor([1]),
        ...              torch.tensor([3]), torch.tensor([4]), ["a", "b"])
        >>> len(b)
        1
    """

    io_ids: torch.Tensor
    s_ids: torch.Tensor
    positions: list[str] = field(default_factory=list)

    def metric(self) -> "IOIMetric":
        """The :class:`IOIMetric` for this batch."""
        return IOIMetric(self.io_ids, self.s_ids, self.last_pos)


def encode_ioi(pairs: Sequence[IOIPair], tokenizer: Any, device: Any = None) -> IOIBatch:
    """Tokenize IOI pairs into an :class:`IOIBatch` (right padding).

    Args:
        pairs: Pairs from :func:`generate_ioi_pairs` (use its ``tokenizer=``
            argument so that names are single tokens).
        tokenizer: HF tokenizer. Its pad token (else eos, else 0) pads rows.
        device: Optional device for the tensors.

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> batch = encode_ioi(generate_ioi_pairs(4, tokenizer=tok), tok)
        >>> batch.clean_ids.shape == batch.corrupt_ids.shape
        True
    """
    clean, corrupt, mask, last, positions = tokenize_aligned(
        [p.clean_prompt for p in pairs], [p.corrupt_prompt for p in pairs], tokenizer, device
    )
    io_ids = word_ids([p.io_name for p in pairs], tokenizer, device)
    s_ids = word_ids([p.s_name for p in pairs], tokenizer, device)
    return IOIBatch(clean, corrupt, mask, last, io_ids, s_ids, positions)


class IOIMetric(LogitDiff):
    """Callable IOI logit-difference metric, usable as ``metric=`` argument.

    A :class:`~captum_relp.LogitDiff` of the indirect object over the subject at
    each row's last real position.

    Example:
        >>> m = IOIMetric(torch.tensor([1]), torch.tensor([2]), torch.tensor([0]))
        >>> m(torch.tensor([[[0.0, 3.0, 1.0]], [[0.0, 1.0, 1.0]]]))
        tensor([2., 0.])
    """

    def __init__(self, io_ids: torch.Tensor, s_ids: torch.Tensor, last_pos: torch.Tensor) -> None:
        super().__init__(io_ids, s_ids, last_pos)
        self.io_ids, self.s_ids, self.last_pos = io_ids, s_ids, last_pos

    def __repr__(self) -> str:
        return f"IOIMetric(n={self.io_ids.shape[0]})"


def ioi_metric(
    logits: torch.Tensor, io_ids: torch.Tensor, s_ids: torch.Tensor, last_pos: torch.Tensor
) -> torch.Tensor:
    """Logit difference ``logit(IO) - logit(S)`` at the last prompt position.

    The function form of :class:`IOIMetric` (``k * N`` logit rows read as tiled copies).

    Example:
        >>> logits = torch.zeros(1, 2, 5); logits[0, 1, 3] = 2.0; logits[0, 1, 4] = 0.5
        >>> ioi_metric(logits, torch.tensor([3]), torch.tensor([4]), torch.tensor([1]))
        tensor([1.5000])
    """
    return IOIMetric(io_ids, s_ids, last_pos)(logits)
