"""``--task PATH`` for ``circuit`` and ``edges``: a task file, loaded and checked before any work."""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..tasks import TASKS
from ..tasks.file_task import TaskFile, load_task_file
from ._common import EXIT_TASK, CLIError, default_out

TASK_HELP = f"contrastive task: {', '.join(TASKS)}, or a .csv/.jsonl file of pairs (see attribute --task)"


def resolve_task(args: argparse.Namespace, command: str) -> Optional[TaskFile]:
    """The task file named by ``--task`` (``None`` for a built-in task); a bad file exits with code 3
    before the model loads. The default ``--out`` then names the file's stem.

    Example:
        >>> resolve_task(argparse.Namespace(task="ioi"), "edges") is None
        True
    """
    if args.task in TASKS:
        return None
    path = Path(args.task)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise CLIError(f"--task takes one of {list(TASKS)} or a .csv/.jsonl file, got {args.task!r}")
    try:
        task = load_task_file(path)
    except ValueError as error:
        raise CLIError(str(error), EXIT_TASK) from error
    if args.out is None:
        named = argparse.Namespace(model=args.model, task=path.stem, convention=getattr(args, "convention", None))
        args.out = default_out(named, command)
    return task


def print_task_check(check: Optional[dict]) -> None:
    """Print the task check of a task-file run (its warnings on stderr too); nothing for built-in tasks.

    Example:
        >>> print_task_check(None)
    """
    if check is None:
        return
    import sys

    from ..tasks.competence import Competence

    print(Competence(**check).summary())
    for warning in check["warnings"]:
        print(f"captum-relp: warning: the model may not solve this task: {warning}", file=sys.stderr)


@contextmanager
def rows_named(task: Optional[TaskFile]) -> Iterator[None]:
    """Inside: a ``ValueError`` about a row of ``task`` (this tokenizer cannot encode it) exits with code 3."""
    try:
        yield
    except ValueError as error:
        if task is not None and str(error).startswith(str(task.path)):
            raise CLIError(str(error), EXIT_TASK) from error
        raise
