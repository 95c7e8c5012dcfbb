"""Subject-verb agreement (SVA) task (RelP Table 3, after Marks et al. 2025).

Three structures of contrastive pairs that differ only in the grammatical
number of the noun the next verb must agree with:

* ``within_rc``: ``The athlete that the managers`` -> ``like`` (not ``likes``)
* ``across_rc``: ``The athlete that the managers like`` -> ``is`` (not ``are``)
* ``across_pp``: ``The secretaries near the cars`` -> ``have`` (not ``has``)

Example:
    >>> p = generate_sva_pairs(1, "across_pp", seed=0)[0]
    >>> p.structure
    'across_pp'
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from captum_relp.metrics import ProbDiff
from captum_relp.tasks._pairs import PairBatch, is_single_token, tokenize_aligned, word_ids

NOUNS: tuple[tuple[str, str], ...] = (
    ("athlete", "athletes"), ("manager", "managers"), ("secretary", "secretaries"),
    ("doctor", "doctors"), ("teacher", "teachers"), ("student", "students"),
    ("farmer", "farmers"), ("lawyer", "lawyers"), ("pilot", "pilots"),
    ("author", "authors"), ("senator", "senators"), ("dancer", "dancers"),
    ("singer", "singers"), ("officer", "officers"), ("painter", "painters"),
    ("driver", "drivers"), ("customer", "customers"), ("architect", "architects"),
    ("surgeon", "surgeons"), ("banker", "bankers"), ("guard", "guards"),
    ("nurse", "nurses"), ("chef", "chefs"), ("judge", "judges"),
    ("actor", "actors"), ("baker", "bakers"), ("clerk", "clerks"),
    ("editor", "editors"), ("minister", "ministers"), ("client", "clients"),
)
"""(singular, plural) noun pairs."""

RC_VERBS: tuple[tuple[str, str], ...] = (
    ("likes", "like"), ("sees", "see"), ("knows", "know"), ("helps", "help"),
    ("admires", "admire"), ("hates", "hate"),
)
"""(singular, plural) transitive verbs used inside relative clauses."""

MAIN_VERBS: tuple[tuple[str, str], ...] = (
    ("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"),
)
"""(singular, plural) main-clause verbs used for the across-RC / across-PP tasks."""

VERBS: tuple[tuple[str, str], ...] = RC_VERBS + MAIN_VERBS
"""All (singular, plural) verb forms."""

PREPOSITIONS: tuple[str, ...] = ("near", "behind", "beside", "above", "below", "with")
"""Prepositions for the across-PP structure."""

STRUCTURES: tuple[str, ...] = ("within_rc", "across_rc", "across_pp")
"""Supported SVA structures."""


@dataclass
class SVAPair:
    """A clean/corrupted SVA prompt pair.

    ``correct_verb`` / ``wrong_verb`` refer to the clean prompt; for the
    corrupted prompt they swap roles.

    Example:
        >>> SVAPair("The doctor near the cars", "The doctors near the cars",
        ...         "has", "have", "across_pp").correct_verb
        'has'
    """

    clean_prompt: str
    corrupt_prompt: str
    correct_verb: str
    wrong_verb: str
    structure: str


def split_nouns(
    seed: int = 0, n_heldout: int = 6, nouns: Sequence[tuple[str, str]] | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split noun pairs into disjoint (train, held-out) lists.

    Example:
        >>> train, held = split_nouns(0, 6)
        >>> len(held), set(train).isdisjoint(held)
        (6, True)
    """
    nouns = list(NOUNS if nouns is None else nouns)
    if not 0 <= n_heldout <= len(nouns):
        raise ValueError(f"n_heldout must be in [0, {len(nouns)}]")
    order = list(range(len(nouns)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_heldout])
    return [nouns[i] for i in range(len(nouns)) if i not in held], [nouns[i] for i in held]


def _filter_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Any) -> list[tuple[str, str]]:
    return [
        p for p in pairs if is_single_token(p[0], tokenizer) and is_single_token(p[1], tokenizer)
    ]


def sva_sentence(
    structure: str,
    subj: tuple[str, str],
    subj_plural: bool,
    other: tuple[str, str],
    other_plural: bool,
    rc_verb: tuple[str, str] = ("likes", "like"),
    prep: str = "near",
) -> str:
    """Build one SVA prompt.

    ``subj`` is the sentence head noun, ``other`` the RC / PP noun. For
    ``within_rc`` the next verb agrees with ``other``, otherwise with ``subj``.

    Example:
        >>> sva_sentence("across_pp", ("doctor", "doctors"), True, ("car", "cars"), False)
        'The doctors near the car'
    """
    s = subj[int(subj_plural)]
    o = other[int(other_plural)]
    if structure == "within_rc":
        return f"The {s} that the {o}"
    if structure == "across_rc":
        return f"The {s} that the {o} {rc_verb[int(other_plural)]}"
    if structure == "across_pp":
        return f"The {s} {prep} the {o}"
    raise ValueError(f"unknown structure {structure!r}; choose from {STRUCTURES}")


def generate_sva_pairs(
    n: int,
    structure: str = "across_pp",
    seed: int = 0,
    nouns: Sequence[tuple[str, str]] | None = None,
    tokenizer: Any = None,
    other_nouns: Sequence[tuple[str, str]] | None = None,
) -> list[SVAPair]:
    """Generate ``n`` deterministic clean/corrupted SVA pairs.

    Args:
        n: Number of pairs.
        structure: One of ``"within_rc"``, ``"across_rc"``, ``"across_pp"``.
        seed: Random seed.
        nouns: (singular, plural) pairs for the noun the verb agrees with
            (default :data:`NOUNS`); use held-out nouns from :func:`split_nouns`.
        tokenizer: Optional tokenizer; keeps only nouns / verbs that are a
            single token with a leading space.
        other_nouns: Pairs for the distractor noun (default: ``nouns``).

    Example:
        >>> pairs = generate_sva_pairs(3, "within_rc", seed=0)
        >>> pairs == generate_sva_pairs(3, "within_rc", seed=0)
        True
        >>> pairs[0].clean_prompt.startswith("The ")
        True
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose from {STRUCTURES}")
    nouns = _filter_pairs(NOUNS if nouns is None else nouns, tokenizer)
    others = nouns if other_nouns is None else _filter_pairs(other_nouns, tokenizer)
    rc_verbs = _filter_pairs(RC_VERBS, tokenizer)
    main_verbs = _filter_pairs(MAIN_VERBS, tokenizer)
    if not nouns or not others or not rc_verbs or not main_verbs:
        raise ValueError("no single-token nouns/verbs left for this tokenizer")
    rng = random.Random(seed)
    out: list[SVAPair] = []
    while len(out) < n:
        agree_noun = rng.choice(nouns)
        other_noun = rng.choice(others)
        plural = rng.random() < 0.5
        other_plural = rng.random() < 0.5
        rc_verb = rng.choice(rc_verbs)
        prep = rng.choice(PREPOSITIONS)
        target = rng.choice(rc_verbs if structure == "within_rc" else main_verbs)
        if structure == "within_rc":
            # the RC noun carries the agreement; the head noun is the distractor
            clean, corrupt = (sva_sentence(structure, other_noun, other_plural, agree_noun, p, rc_verb, prep)
                              for p in (plural, not plural))
        else:
            clean, corrupt = (sva_sentence(structure, agree_noun, p, other_noun, other_plural, rc_verb, prep)
                              for p in (plural, not plural))
        out.append(SVAPair(clean, corrupt, target[int(plural)], target[int(not plural)], structure))
    return out


@dataclass
class SVABatch(PairBatch):
    """Tokenized SVA pairs (right-padded); see :class:`~captum_relp.tasks.ioi.IOIBatch`.

    Example:
        >>> z = torch.zeros(1, 2, dtype=torch.long)
        >>> len(SVABatch(z, z, z + 1, torch.tensor([1]), torch.tensor([0]), torch.tensor([1])))
        1
    """

    correct_ids: torch.Tensor
    wrong_ids: torch.Tensor
    positions: list[str] = field(default_factory=list)

    def metric(self) -> "SVAMetric":
        """The :class:`SVAMetric` for this batch."""
        return SVAMetric(self.correct_ids, self.wrong_ids, self.last_pos)


def encode_sva(pairs: Sequence[SVAPair], tokenizer: Any, device: Any = None) -> SVABatch:
    """Tokenize SVA pairs into an :class:`SVABatch` (right padding).

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> b = encode_sva(generate_sva_pairs(4, "across_rc", tokenizer=tok), tok)
        >>> b.correct_ids.shape
        torch.Size([4])
    """
    clean, corrupt, mask, last, positions = tokenize_aligned(
        [p.clean_prompt for p in pairs], [p.corrupt_prompt for p in pairs], tokenizer, device
    )
    correct = word_ids([p.correct_verb for p in pairs], tokenizer, device)
    wrong = word_ids([p.wrong_verb for p in pairs], tokenizer, device)
    return SVABatch(clean, corrupt, mask, last, correct, wrong, positions)


class SVAMetric(ProbDiff):
    """Callable SVA probability-difference metric, usable as ``metric=``.

    A :class:`~captum_relp.ProbDiff` of the correct over the wrong verb form at
    each row's last real position.

    Example:
        >>> m = SVAMetric(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
        >>> m(torch.zeros(2, 1, 2))
        tensor([0., 0.])
    """

    def __init__(
        self, correct_ids: torch.Tensor, wrong_ids: torch.Tensor, last_pos: torch.Tensor
    ) -> None:
        super().__init__(correct_ids, wrong_ids, last_pos)
        self.correct_ids, self.wrong_ids, self.last_pos = correct_ids, wrong_ids, last_pos

    def __repr__(self) -> str:
        return f"SVAMetric(n={self.correct_ids.shape[0]})"


def sva_metric(
    logits: torch.Tensor,
    correct_ids: torch.Tensor,
    wrong_ids: torch.Tensor,
    last_pos: torch.Tensor,
) -> torch.Tensor:
    """``p(correct) - p(wrong)`` (softmax probabilities) at the last position.

    The function form of :class:`SVAMetric`.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
        >>> sva_metric(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
        tensor([0.5000])
    """
    return SVAMetric(correct_ids, wrong_ids, last_pos)(logits)
