"""Tokenize the pairs of a task file into a batch, with the answers its metric reads.

**Alignment.** Each row holds a clean and a corrupted prompt of the same pair. When they
tokenize to different lengths, the shorter one is shifted right so that both *end at the same
position*: the last prompt token of the pair sits at one index in both rows, where the metric
reads it. The positions in front of the shorter prompt hold the pad token (else eos) and are
attended to (the attention mask is one mask for both prompts: 1 over the longer prompt, 0 on
the right padding), so the shorter prompt reads as if preceded by a document separator. Rows
are right-padded to the longest row of the batch; positions are compared between the two
prompts of a pair, never across pairs.

**Teacher forcing.** An answer longer than one token (a string answer under ``logprob``; a
greater-than year written as two digit tokens) has all but its last token appended to both
prompts, so the metric reads the model's prediction of each later token given the earlier ones.

Example:
    >>> from captum_relp.embedded import load_embedded
    >>> from captum_relp.tasks.file_task import TaskPair
    >>> model, tok = load_embedded("tiny-gpt2-ioi")
    >>> pair = TaskPair("Then, Mary and John went to the store. John gave a ring to",
    ...                 "Then, John and Mary went to the store. Mary gave a ring to", answer="Mary", foil="John")
    >>> batch = encode_task([pair], tok)
    >>> tok.decode(batch.clean_ids[0, int(batch.last_pos[0])])
    ' to'
    >>> bool(batch.metric()(model(batch.clean_ids, attention_mask=batch.attention_mask).logits) > 0)
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from captum_relp.tasks._pairs import PairBatch, pad_id
from captum_relp.tasks.file_metrics import (
    METRICS,
    AnswerLogProb,
    DigitYearProbDiff,
    ReadMetric,
    SetLogitDiff,
    SetProbDiff,
    padded,
)
from captum_relp.tasks.file_task import TaskFile, TaskPair

DEFAULT_METRIC = {"ids": "logit-diff", "strings": "logit-diff", "greater-than": "prob-diff"}
"""The metric used for each kind of task file unless another is chosen."""


@dataclass
class TaskBatch(PairBatch):
    """Tokenized pairs of a task file (right-padded, each pair aligned at its last prompt token).

    Attributes:
        clean_ids: ``(N, T)`` clean prompts.
        corrupt_ids: ``(N, T)`` corrupted prompts.
        attention_mask: ``(N, T)``.
        last_pos: ``(N,)`` the last prompt token of each row (where the metric reads).
        correct: ``(N, K)`` answer ids at the first step (``-1`` pads).
        incorrect: ``(N, K)`` foil ids at the first step (``-1`` pads).
        rest: ``(N, m - 1)`` later tokens of a teacher-forced answer (``-1`` pads), or empty.
        labels: ``(N,)`` greater-than labels (``-1`` for other tasks).
        metric_name: one of :data:`~captum_relp.tasks.file_metrics.METRICS`.
        digit_ids: token ids of the digits 0-9 when years are two digit tokens, else empty.
    """

    correct: torch.Tensor
    incorrect: torch.Tensor
    rest: torch.Tensor
    labels: torch.Tensor
    metric_name: str = "logit-diff"
    digit_ids: Tuple[int, ...] = field(default_factory=tuple)

    def metric(self) -> ReadMetric:
        """The metric of this batch (see :mod:`captum_relp.tasks.file_metrics`)."""
        if self.digit_ids:
            return DigitYearProbDiff(self.labels, self.digit_ids, self.last_pos)
        if self.metric_name == "logprob":
            return AnswerLogProb(self.correct, self.rest if self.rest.shape[1] else None, self.last_pos)
        if self.metric_name == "prob-diff":
            return SetProbDiff(self.correct, self.incorrect, self.last_pos)
        return SetLogitDiff(self.correct, self.incorrect, self.last_pos)


def _answer_tokens(tokenizer: Any, prompt: str, prompt_ids: List[int], answer: str) -> List[int]:
    """The tokens ``answer`` adds after ``prompt`` (a space between them unless one has it)."""
    sep = "" if answer[:1].isspace() or prompt[-1:].isspace() else " "
    full = tokenizer(prompt + sep + answer)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return list(full[len(prompt_ids):])
    return list(tokenizer.encode(sep + answer, add_special_tokens=False))


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return "[" + ", ".join(repr(tokenizer.decode([i])) for i in ids) + "]"


def _year_tokens(tokenizer: Any, pair: TaskPair, prompt_ids: List[int]) -> Tuple[List[List[int]], str]:
    """The tokens of each year 00-99 after the clean prompt, and the mode: ``single`` or ``digits``."""
    years = [_tail(tokenizer, pair.clean, prompt_ids, f"{y:02d}") for y in range(100)]
    if all(len(t) == 1 for t in years) and len({t[0] for t in years}) == 100:
        return years, "single"
    if all(len(t) == 2 for t in years):
        digits = {y // 10: t[0] for y, t in zip(range(100), years)}
        if all(t == [digits[y // 10], digits[y % 10]] for y, t in zip(range(100), years)):
            return years, "digits"
    raise ValueError(f"{pair.where('label')}: the tokenizer writes the years after this prompt neither as one "
                     f"token each nor as two digit tokens (e.g. '52' -> {_decode(tokenizer, years[52])})")


def _tail(tokenizer: Any, prompt: str, prompt_ids: List[int], text: str) -> List[int]:
    full = tokenizer(prompt + text)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        return []
    return list(full[len(prompt_ids):])


def _check_ids(pair: TaskPair, field_name: str, ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise ValueError(f"{pair.where(field_name)}: token id {bad[0]} is beyond the vocabulary "
                         f"({vocab_size} tokens)")


def _string_answer(tokenizer: Any, pair: TaskPair, prompt_ids: List[int], field_name: str,
                   ids: Optional[Tuple[int, ...]], sequences: bool) -> List[int]:
    text = getattr(pair, field_name)
    tokens = _answer_tokens(tokenizer, pair.clean, prompt_ids, text)
    if not tokens:
        raise ValueError(f"{pair.where(field_name)}: {text!r} encodes to no token")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in tokens:
        raise ValueError(f"{pair.where(field_name)}: {text!r} encodes to the unknown token {_decode(tokenizer, tokens)}: "
                         "this tokenizer does not know it")
    if ids is not None and tokens != list(ids) and not (len(tokens) == 1 and tokens[0] in ids):
        id_field = "correct_idx" if field_name == "answer" else "incorrect_idx"
        raise ValueError(f"{pair.where(field_name)}: {text!r} encodes to {tokens} {_decode(tokenizer, tokens)}, "
                         f"but {id_field} gives {list(ids)} {_decode(tokenizer, ids)}")
    if len(tokens) > 1 and not sequences:
        raise ValueError(f"{pair.where(field_name)}: {text!r} is {len(tokens)} tokens {_decode(tokenizer, tokens)}; "
                         "this metric reads one token: use the logprob metric, which scores token sequences")
    return tokens


def _answers(tokenizer: Any, pair: TaskPair, kind: str, metric: str, prompt_ids: List[int],
             vocab_size: int) -> Dict[str, Any]:
    """``correct``, ``incorrect`` (first-step sets), ``forced`` (appended tokens), ``rest``, ``digits``."""
    if kind == "greater-than":
        years, mode = _year_tokens(tokenizer, pair, prompt_ids)
        label = int(pair.label)  # type: ignore[arg-type]
        if mode == "digits":
            digits = [years[d * 10][0] for d in range(10)]
            return {"correct": [], "incorrect": [], "forced": [digits[label // 10]], "rest": [], "digits": digits}
        return {"correct": [t[0] for t in years[label + 1:]] or [years[99][0]],
                "incorrect": [t[0] for t in years[: label + 1]], "forced": [], "rest": [], "digits": []}
    for name, ids in (("correct_idx", pair.correct_ids), ("incorrect_idx", pair.incorrect_ids)):
        if ids is not None:
            _check_ids(pair, name, ids, vocab_size)
    sequences = metric == "logprob"
    correct, incorrect = list(pair.correct_ids or ()), list(pair.incorrect_ids or ())
    forced: List[int] = []
    rest: List[int] = []
    if pair.answer is not None:
        tokens = _string_answer(tokenizer, pair, prompt_ids, "answer", pair.correct_ids, sequences)
        correct = correct if pair.correct_ids is not None and len(tokens) == 1 else tokens[:1]
        forced, rest = tokens[:-1], tokens[1:]
    if pair.foil is not None:
        tokens = _string_answer(tokenizer, pair, prompt_ids, "foil", pair.incorrect_ids, sequences)
        incorrect = incorrect if pair.incorrect_ids is not None and len(tokens) == 1 else tokens[:1]
    return {"correct": correct, "incorrect": incorrect, "forced": forced, "rest": rest, "digits": []}


def encode_task(task: Union[TaskFile, Sequence[TaskPair]], tokenizer: Any, metric: Optional[str] = None,
                vocab_size: Optional[int] = None, device: Any = None, swap: bool = False) -> TaskBatch:
    """Tokenize task pairs into a :class:`TaskBatch` (see the module docstring for the alignment).

    Args:
        task: a :class:`~captum_relp.tasks.file_task.TaskFile` or its pairs.
        tokenizer: the model's tokenizer.
        metric: one of :data:`~captum_relp.tasks.file_metrics.METRICS` (default: logit
            difference; greater-than: probability difference).
        vocab_size: the model's vocabulary size (ids are checked against it; default the tokenizer's).
        device: device of the tensors.
        swap: score the foil as the answer (``logprob``: to compare answer and foil).

    Raises:
        ValueError: naming the file, the line and the field of a row that cannot be encoded.

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> _, tok = load_embedded("tiny-gpt2-ioi")
        >>> encode_task([TaskPair("Then , Mary", "Then , John", correct_ids=(5000,), incorrect_ids=(7,),
        ...                       line=4, source="t.csv")], tok)
        Traceback (most recent call last):
        ...
        ValueError: t.csv, line 4, field correct_idx: token id 5000 is beyond the vocabulary (3639 tokens)
    """
    pairs = list(task.pairs if isinstance(task, TaskFile) else task)
    if not pairs:
        raise ValueError("no pairs to encode")
    kind = task.kind if isinstance(task, TaskFile) else _kind_of(pairs[0])
    metric = metric or DEFAULT_METRIC[kind]
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind == "greater-than" and metric != "prob-diff":
        raise ValueError(f"{pairs[0].where('label')}: greater-than files use the prob-diff metric, got {metric!r}")
    vocab_size = int(vocab_size or len(tokenizer))
    rows: List[Tuple[List[int], List[int], int]] = []
    answers: List[Dict[str, Any]] = []
    for pair in pairs:
        clean = list(tokenizer(pair.clean)["input_ids"])
        corrupt = list(tokenizer(pair.corrupted)["input_ids"])
        found = _answers(tokenizer, pair, kind, metric, clean, vocab_size)
        if swap:
            if pair.foil is not None:
                swapped = TaskPair(pair.clean, pair.corrupted, pair.incorrect_ids, pair.correct_ids, pair.foil,
                                   pair.answer, None, pair.line, pair.source)
                found = _answers(tokenizer, swapped, kind, metric, clean, vocab_size)
            else:
                found = dict(found, correct=found["incorrect"], incorrect=found["correct"])
        length = max(len(clean), len(corrupt))
        pad = pad_id(tokenizer)
        clean = [pad] * (length - len(clean)) + clean + found["forced"]
        corrupt = [pad] * (length - len(corrupt)) + corrupt + found["forced"]
        rows.append((clean, corrupt, length - 1))
        answers.append(found)
    width = max(len(c) for c, _, _ in rows)
    n, pad = len(rows), pad_id(tokenizer)
    clean_ids = torch.full((n, width), pad, dtype=torch.long)
    corrupt_ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (c, k, _) in enumerate(rows):
        clean_ids[i, : len(c)], corrupt_ids[i, : len(k)], mask[i, : len(c)] = torch.tensor(c), torch.tensor(k), 1
    digits = tuple(answers[0]["digits"])
    batch = TaskBatch(
        clean_ids, corrupt_ids, mask, torch.tensor([last for _, _, last in rows]),
        correct=padded([a["correct"] or [-1] for a in answers]),
        incorrect=padded([a["incorrect"] or [-1] for a in answers]),
        rest=padded([a["rest"] for a in answers]) if any(a["rest"] for a in answers) else torch.zeros(n, 0, dtype=torch.long),
        labels=torch.tensor([p.label if p.label is not None else -1 for p in pairs]),
        metric_name=metric, digit_ids=digits)
    return batch.to(device) if device is not None else batch


def check_one_layout(task: TaskFile, tokenizer: Any, batch: TaskBatch, why: str) -> None:
    """Raise unless every pair of ``task`` has one token layout: its clean and its corrupted prompt
    have as many tokens as the first pair's clean prompt, and its encoded row (``batch``, answer
    tokens teacher-forced included) is as long as the first row. Position ``t`` then means the same
    place in every pair; whether it plays the same *role* (the same kind of word) is the file's to ensure.

    Args:
        task: the pairs, as loaded.
        tokenizer: the model's tokenizer.
        batch: ``task`` encoded by :func:`encode_task`.
        why: what needs the layout (ends the error message).

    Raises:
        ValueError: naming the file and the first pair (its line) that does not share the layout.

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> _, tok = load_embedded("tiny-gpt2-ioi")
        >>> short, long = "Then, John gave a ring to", "Then, Mary and John went to the store. John gave a ring to"
        >>> task = TaskFile([TaskPair(short, short.replace("John", "Anna"), answer=" Mary", foil=" John", line=2),
        ...                  TaskPair(long, long.replace("John", "Anna"), answer=" Mary", foil=" John", line=3)],
        ...                 "strings", "t.csv")
        >>> check_one_layout(task, tok, encode_task(task, tok), "they are averaged per position")
        Traceback (most recent call last):
        ...
        ValueError: t.csv, line 3: the clean prompt has 16 tokens and the corrupted 16, the first pair (line 2) 8: every pair needs one token layout (as many tokens in each prompt) because they are averaged per position
    """
    first = task.pairs[0]
    width = len(tokenizer(first.clean)["input_ids"])
    lengths = batch.attention_mask.sum(1).tolist()
    for pair, length in zip(task.pairs, lengths):
        clean, corrupted = len(tokenizer(pair.clean)["input_ids"]), len(tokenizer(pair.corrupted)["input_ids"])
        if clean != width or corrupted != width:
            found = f"the clean prompt has {clean} tokens and the corrupted {corrupted}, the first pair (line {first.line}) {width}"
        elif length != lengths[0]:
            found = (f"with its answer teacher-forced the row has {int(length)} tokens, the first pair's "
                     f"(line {first.line}) {int(lengths[0])}")
        else:
            continue
        raise ValueError(f"{task.path}, line {pair.line}: {found}: every pair needs one token layout "
                         f"(as many tokens in each prompt) because {why}")


def _kind_of(pair: TaskPair) -> str:
    if pair.label is not None:
        return "greater-than"
    return "ids" if pair.correct_ids is not None else "strings"


def describe_answers(task: Union[TaskFile, Sequence[TaskPair]], tokenizer: Any, rows: int = 3) -> List[str]:
    """How the tokenizer reads the first ``rows`` answers given as ids (empty for other files).

    A file written for another tokenizer shows here: its ids decode to unrelated tokens.

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> _, tok = load_embedded("tiny-gpt2-ioi")
        >>> describe_answers([TaskPair("a", "b", correct_ids=(6,), incorrect_ids=(7,), line=2)], tok)
        ["line 2: correct_idx [6] -> [' Adam'], incorrect_idx [7] -> [' After']"]
    """
    pairs = list(task.pairs if isinstance(task, TaskFile) else task)
    out = []
    for pair in pairs[:rows]:
        if pair.correct_ids is None and pair.incorrect_ids is None:
            continue
        parts = [f"{name} {list(ids)} -> {_decode(tokenizer, ids)}"
                 for name, ids in (("correct_idx", pair.correct_ids), ("incorrect_idx", pair.incorrect_ids))
                 if ids is not None]
        out.append(f"line {pair.line}: " + ", ".join(parts))
    return out


__all__ = ["DEFAULT_METRIC", "TaskBatch", "encode_task", "describe_answers", "check_one_layout"]
