"""Synthetic corpus and word-level tokenizer for the embedded toy models.

Used by ``scripts/train_embedded.py``. The corpus mixes

* IOI sentences (three RelP templates, both ``B and A`` / ``A and B`` name
  orders) using only *training* names,
* SVA sentences (relative clause and prepositional phrase structures, with the
  correct verb and a short continuation) using only *training* nouns,
* filler sentences from a small random grammar that use *all* names and nouns
  (so held-out words still get trained embeddings, but never in IOI/SVA
  templates).

Example:
    >>> spec = CorpusSpec(seed=0)
    >>> sents = build_corpus(spec, 10)
    >>> len(sents)
    10
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from captum_relp.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES
from captum_relp.tasks.sva import MAIN_VERBS, NOUNS, PREPOSITIONS, RC_VERBS, split_nouns

ADJECTIVES = ("happy", "tired", "busy", "late", "ready", "here", "away", "young", "old", "kind")
FILLER_VERBS = (("walks", "walk"), ("sleeps", "sleep"), ("waits", "wait"), ("works", "work"))
SPECIALS = ("<unk>", "<pad>", "<bos>", "<eos>")


def _pseudo_words(n: int, seed: int, capital: bool) -> list[str]:
    """Deterministic pronounceable pseudo-words (training-only names / nouns)."""
    rng = random.Random(seed)
    on, nu, co = "bdfgklmnprstvz", "aeiou", "lnrstkm"
    out: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(on) + rng.choice(nu) for _ in range(2)) + rng.choice(co)
        out.add(w.capitalize() if capital else w)
    return sorted(out)


PSEUDO_NAMES: list[str] = _pseudo_words(240, 1, capital=True)
"""Training-only pseudo names: many IOI names force a generic (not memorised) circuit."""
PSEUDO_NOUNS: list[tuple[str, str]] = [(w, w + "s") for w in _pseudo_words(90, 2, False)]
"""Training-only pseudo noun pairs, for the same reason in SVA."""
PRETOKENIZE_PATTERN = r" ?[A-Za-z]+| ?[^\sA-Za-z]"


@dataclass
class CorpusSpec:
    """What goes in the corpus; held-out names/nouns are derived from ``seed``.

    Example:
        >>> s = CorpusSpec(seed=0)
        >>> len(s.heldout_names), set(s.heldout_names).isdisjoint(s.train_names)
        (12, True)
    """

    seed: int = 0
    n_heldout_names: int = 12
    n_heldout_nouns: int = 6
    p_ioi: float = 0.45
    p_sva: float = 0.30
    n_pseudo_names: int = 240
    p_copy: float = 0.0
    train_names: list[str] = field(init=False)
    heldout_names: list[str] = field(init=False)
    train_nouns: list[tuple[str, str]] = field(init=False)
    heldout_nouns: list[tuple[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        names = list(NAMES)
        random.Random(1000 + self.seed).shuffle(names)
        self.heldout_names = sorted(names[: self.n_heldout_names])
        self.pseudo_names = _pseudo_words(self.n_pseudo_names, 1, capital=True)
        self.train_names = sorted(names[self.n_heldout_names :]) + self.pseudo_names
        self.train_nouns, self.heldout_nouns = split_nouns(self.seed, self.n_heldout_nouns)
        self.train_nouns = self.train_nouns + PSEUDO_NOUNS


def ioi_sentence(rng: random.Random, names: list[str]) -> str:
    """A full IOI sentence (random template and first-clause name order)."""
    a, b = rng.sample(names, 2)
    t = rng.randrange(len(TEMPLATES))
    first = (b, a) if rng.random() < 0.5 else (a, b)
    tpl = TEMPLATES[t].replace("{B} and {A}", "{X} and {Y}")
    text = tpl.format(X=first[0], Y=first[1], B=b, PLACE=rng.choice(PLACES),
                      OBJECT=rng.choice(OBJECTS))
    return f"{text} {a}."


def _continuation(rng: random.Random, verb: tuple[str, str], plural: bool) -> str:
    v = verb[int(plural)]
    if verb[0] in ("is", "was"):
        return f"{v} {rng.choice(ADJECTIVES)}."
    if verb[0] == "has":
        return f"{v} a {rng.choice(OBJECTS)}."
    if verb[0] == "does":
        return f"{v} the work."
    return f"{v} the {rng.choice(OBJECTS)}."


def sva_sentence(rng: random.Random, nouns: list[tuple[str, str]]) -> str:
    """A full SVA sentence: ``The N that the M v V ...`` or ``The N prep the M V ...``."""
    subj, other = rng.choice(nouns), rng.choice(nouns)
    sp, op = rng.random() < 0.5, rng.random() < 0.5
    main = rng.choice(MAIN_VERBS)
    if rng.random() < 0.5:
        rc = rng.choice(RC_VERBS)
        head = f"The {subj[int(sp)]} that the {other[int(op)]} {rc[int(op)]}"
    else:
        head = f"The {subj[int(sp)]} {rng.choice(PREPOSITIONS)} the {other[int(op)]}"
    return f"{head} {_continuation(rng, main, sp)}"


def filler_sentence(rng: random.Random, spec: "CorpusSpec | None" = None) -> str:
    """A simple random sentence over the full vocabulary (all names and nouns)."""
    # half of the fillers use real names / nouns (incl. held-out ones), half pseudo words
    pseudo = spec.pseudo_names if spec is not None else PSEUDO_NAMES
    n1, n2 = rng.sample(list(NAMES) if rng.random() < 0.5 else pseudo, 2)
    if spec is not None and rng.random() < spec.p_copy:
        # a two-sentence copy pattern (not an IOI template), over all names incl. held-out ones
        return f"{n1} met {n2}. {n2} thanked {n1}."
    noun = rng.choice(NOUNS if rng.random() < 0.5 else PSEUDO_NOUNS)
    pl = rng.random() < 0.5
    kind = rng.randrange(11)
    if kind == 9:
        return f"{rng.choice(('Then,', 'When,'))} {n1} and {n2} went to the {rng.choice(PLACES)}."
    if kind == 10:
        return f"After {n1} and {n2} went to the {rng.choice(PLACES)}, they sat down."
    if kind == 0:
        return f"{n1} likes the {rng.choice(OBJECTS)}."
    if kind == 1:
        return f"{n1} went to the {rng.choice(PLACES)}."
    if kind == 2:
        return f"{n1} talked to {n2}."
    if kind == 3:
        return f"{n1} and {n2} are friends."
    if kind == 4:
        verb = rng.choice(MAIN_VERBS + RC_VERBS)
        return f"The {noun[int(pl)]} {_continuation(rng, verb, pl)}"
    if kind == 5:
        verb = rng.choice(FILLER_VERBS)
        return f"The {noun[int(pl)]} {verb[int(pl)]} near the {rng.choice(PLACES)}."
    if kind == 6:
        rc = rng.choice(RC_VERBS)
        other = rng.choice(NOUNS + tuple(PSEUDO_NOUNS))[int(rng.random() < 0.5)]
        return f"The {noun[int(pl)]} {rc[int(pl)]} the {other}."
    if kind == 7:
        return f"{n1} saw the {noun[int(pl)]} at the {rng.choice(PLACES)}."
    return f"The {noun[int(pl)]} gave a {rng.choice(OBJECTS)} to {n1}."


def build_corpus(spec: CorpusSpec, n_sentences: int) -> list[str]:
    """Deterministic list of ``n_sentences`` sentences for ``spec``."""
    rng = random.Random(spec.seed)
    out = []
    for _ in range(n_sentences):
        r = rng.random()
        if r < spec.p_ioi:
            out.append(ioi_sentence(rng, spec.train_names))
        elif r < spec.p_ioi + spec.p_sva:
            out.append(sva_sentence(rng, spec.train_nouns))
        else:
            out.append(filler_sentence(rng, spec))
    return out


def all_words() -> list[str]:
    """Every word the grammar can produce (added to the vocab with and without a space)."""
    words = set(NAMES) | set(PLACES) | set(OBJECTS) | set(PREPOSITIONS) | set(ADJECTIVES)
    for pairs in (NOUNS, MAIN_VERBS, RC_VERBS, FILLER_VERBS):
        for p in pairs:
            words |= set(p)
    for tpl in TEMPLATES:
        words |= {w.strip(",.") for w in tpl.split() if "{" not in w}
    words |= {"likes", "went", "to", "the", "talked", "and", "are", "friends", "The", "near", "met", "thanked",
              "that", "saw", "at", "gave", "a", "work",
              "they", "sat", "down"}
    return sorted(words)


def build_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; tokens carry their leading space (`` Mary``).

    ``tokenizer(text)`` prepends ``<bos>``; ``decode`` reproduces the text exactly.
    """
    pre = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    pieces: set[str] = set()
    for w in all_words():
        pieces |= {w, " " + w}
    pieces |= {",", ".", " ,", " ."}
    for s in sentences:
        pieces |= {p for p, _ in pre.pre_tokenize_str(s)}
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for p in sorted(pieces):
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
        eos_token="<eos>", clean_up_tokenization_spaces=False, model_max_length=64,
    )
