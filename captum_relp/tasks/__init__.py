"""Contrastive prompt tasks: IOI and SVA, and your own pairs from a ``.csv``/``.jsonl`` file.

Example:
    >>> from captum_relp.tasks import generate_ioi_pairs, generate_sva_pairs
    >>> len(generate_ioi_pairs(3)), len(generate_sva_pairs(3, "within_rc"))
    (3, 3)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from captum_relp.tasks.competence import Competence, competence_check
from captum_relp.tasks.file_encode import TaskBatch, check_one_layout, describe_answers, encode_task
from captum_relp.tasks.file_task import TaskFile, TaskPair, load_task_file
from captum_relp.tasks.ioi import (
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    IOIBatch,
    IOIMetric,
    IOIPair,
    encode_ioi,
    generate_ioi_pairs,
    ioi_metric,
)
from captum_relp.tasks.sva import (
    MAIN_VERBS,
    NOUNS,
    PREPOSITIONS,
    RC_VERBS,
    STRUCTURES,
    VERBS,
    SVABatch,
    SVAMetric,
    SVAPair,
    encode_sva,
    generate_sva_pairs,
    split_nouns,
    sva_metric,
)

TASKS = ("sva", "ioi")


def task_splits(task, tokenizer, n_train: int, n_test: int, seed: int,
                heldout: Optional[Sequence] = None) -> List[Tuple[str, object, object]]:
    """``(setting, train_batch, test_batch)`` per setting; the test split uses held-out words.

    ``sva``: one setting per structure; ``ioi``: one template. ``heldout``: the words
    kept out of training (e.g. :func:`captum_relp.embedded.heldout_words`); default: a
    seeded split of the task's words. A :class:`~captum_relp.tasks.file_task.TaskFile`:
    one setting, its first ``n_train`` rows for training and the next ``n_test`` for the test
    (encoded together; every pair must have one token layout, see
    :func:`~captum_relp.tasks.file_encode.check_one_layout`).

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> _, tok = load_embedded()
        >>> [name for name, _, _ in task_splits("sva", tok, 2, 2, seed=0)]
        ['within_rc', 'across_rc', 'across_pp']
    """
    if isinstance(task, TaskFile):
        if len(task) < n_train + n_test:
            raise ValueError(f"{task.path}: {len(task)} rows, fewer than the {n_train} training and {n_test} "
                             "test pairs asked for")
        used = TaskFile(task.pairs[: n_train + n_test], task.kind, task.path)
        batch = encode_task(used, tokenizer)
        check_one_layout(used, tokenizer, batch, "circuit discovery averages node effects and the mean-ablation "
                         "activations over the pairs position by position")
        return [(task.name, batch.select(slice(0, n_train)), batch.select(slice(n_train, n_train + n_test)))]
    if task == "sva":
        if heldout:
            held = [tuple(pair) for pair in heldout]
            train = [pair for pair in NOUNS if tuple(pair) not in held]
        else:
            train, held = split_nouns(seed)
        return [(s, encode_sva(generate_sva_pairs(n_train, s, seed, nouns=train, tokenizer=tokenizer), tokenizer),
                 encode_sva(generate_sva_pairs(n_test, s, seed + 1, nouns=held, tokenizer=tokenizer), tokenizer))
                for s in STRUCTURES]
    if task == "ioi":
        held = list(heldout) if heldout else NAMES[: len(NAMES) // 4]
        train = [n for n in NAMES if n not in held]
        make = lambda n, s, names: encode_ioi(  # noqa: E731
            generate_ioi_pairs(n, seed=s, names=names, templates=(0,), tokenizer=tokenizer), tokenizer)
        return [("template_1", make(n_train, seed, train), make(n_test, seed + 1, held))]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


__all__ = [
    "TASKS", "task_splits",
    "TaskFile", "TaskPair", "TaskBatch", "load_task_file", "encode_task", "describe_answers", "Competence",
    "competence_check",
    "NAMES", "OBJECTS", "PLACES", "TEMPLATES", "IOIBatch", "IOIMetric", "IOIPair",
    "encode_ioi", "generate_ioi_pairs", "ioi_metric",
    "MAIN_VERBS", "NOUNS", "PREPOSITIONS", "RC_VERBS", "STRUCTURES", "VERBS", "SVABatch",
    "SVAMetric", "SVAPair", "encode_sva", "generate_sva_pairs", "split_nouns", "sva_metric",
]
