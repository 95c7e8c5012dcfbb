"""``--out`` holds exactly one run: a run is written to a staging folder and moved in when complete.

Every file of a run, the manifest last, goes into a staging folder next to ``--out`` (same
parent, same filesystem, so moving a file is an atomic rename). Only then are the earlier
run's files moved aside and the new ones moved in, with Ctrl-C held back for those few
renames; a failure or Ctrl-C before that leaves the earlier results in ``--out`` as they were
and removes the staging folder. Files in ``--out`` that captum-relp did not write are never touched.

Commands that checkpoint (``attribute`` on a task file, ``ioi``) save each finished batch in the
hidden folder ``--out/.captum-relp-checkpoint`` (:meth:`ResultsFolder.checkpoint`): it survives
an interrupt or a failure, ``--resume`` reuses it, and it is removed once the run's results are
in ``--out``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from ..experiments.checkpoint import Checkpoint
from ._common import EXIT_ERROR, MANIFEST, CLIError, earlier_run_files, prepare_out, report_written, write_manifest

STAGING = ".captum-relp-staging-"
"""Name prefix of the staging folders (hidden; removed when the run ends, however it ends)."""
CHECKPOINTS = ".captum-relp-checkpoint"
"""The folder in ``--out`` that holds the finished batches of an unfinished run."""
_ASIDE = ".earlier"


class ResultsFolder:
    """The ``--out`` of one command run, as a context manager around the run.

    Entering checks ``--out`` (:func:`prepare_out`: before the model loads); :meth:`write`
    stages the run's files and moves them in; leaving on an exception (Ctrl-C included)
    removes the staging folder and says on stderr that the earlier results are unchanged.

    Example:
        >>> out = Path(tempfile.mkdtemp()) / "results"
        >>> args = argparse.Namespace(out=str(out), overwrite=False, model="m", seed=0)
        >>> def save(folder):  # what an experiment's ``save`` does
        ...     (folder / "ioi_results.json").write_text("{}")
        ...     return [folder / "ioi_results.json"]
        >>> with ResultsFolder(args, "ioi") as results:  # doctest: +ELLIPSIS
        ...     written = results.write(save)
        <BLANKLINE>
        wrote .../results/ioi_results.json
        >>> sorted(p.name for p in out.iterdir())
        ['captum-relp-run.json', 'ioi_results.json']
    """

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args, self.command = args, command
        self.staging: Optional[Path] = None
        self.committed = False
        self.checkpoints: List[Checkpoint] = []

    def __enter__(self) -> "ResultsFolder":
        self.earlier = prepare_out(self.args, self.command)
        self.out = Path(self.args.out)
        real = self.out.resolve()
        self._made = [p for p in [real, *real.parents] if not p.exists()]  # deepest first
        self._parent = staging_parent(self.out)
        return self

    def checkpoint(self, name: str) -> Checkpoint:
        """The checkpoint ``name`` in ``--out/.captum-relp-checkpoint``, checked before the model loads.

        With ``--resume`` its saved batches are reused (the experiment checks that they are of this
        configuration); without it, a checkpoint that is there is refused, or discarded with
        ``--overwrite``. It is removed once the results are in ``--out``.
        """
        resume = bool(getattr(self.args, "resume", False))
        found = Checkpoint(self.out / CHECKPOINTS, name, resume=resume)
        if found.exists() and not resume:
            if not getattr(self.args, "overwrite", False):
                raise CLIError(f"--out {self.out} holds the checkpoint of an unfinished run "
                               f"({len(found.entries())} finished batch results in {found.folder}); pass --resume "
                               "to continue it, or --overwrite to discard it and start again")
            found.discard()
            _say(f"--overwrite: discarded the checkpoint of an unfinished run in {found.folder}")
        elif resume:
            _say(f"--resume: {len(found.entries())} finished batch results in {found.folder} are reused"
                 if found.exists() else f"--resume: no checkpoint in {found.folder}; starting from the first batch")
        self.checkpoints.append(found)
        return found

    def write(self, save: Callable[[Path], List[Path]]) -> List[Path]:
        """``save(folder)`` writes the run's files into the staging folder; then the manifest is
        written and the files replace the earlier run's in ``--out``. Returns the final paths."""
        self._parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING + self.out.resolve().name + "-", dir=self._parent))
        names = [Path(p).name for p in save(self.staging)]
        write_manifest(self.staging, self.args, self.command, names)
        earlier = earlier_run_files(self.out)  # now: the folder may have changed during the run
        if earlier and not getattr(self.args, "overwrite", False):  # (checked at the start too)
            kept, self.staging = self.staging, None  # kept for the user, not replaced nor removed
            raise CLIError(f"--out {self.out} received another run's results while this run ran; this "
                           f"run's files are in {kept}", EXIT_ERROR)
        with _ctrl_c_held():
            swap_in(self.staging, self.out, earlier)
            self.committed = True
            _remove(self.out / CHECKPOINTS)  # the run is complete: its batches are in the results
        _remove(self.staging)
        self.staging = None
        written = [self.out / name for name in names]
        report_written(written, [self.out / p.name for p in earlier if p.name not in names + [MANIFEST]])
        return written

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            return False
        what = "interrupted" if issubclass(kind, KeyboardInterrupt) else "failed"
        if isinstance(error, CLIError) and not error.reported:  # the cause comes first
            _say(f"error: {error}")
            error.reported = True
        kept = sum(len(c.entries()) for c in self.checkpoints)
        for empty in [c for c in self.checkpoints if not c.entries()]:
            empty.discard()
        if kept and not self.committed:
            _say(f"{what}: {kept} finished batch results are kept in {self.out / CHECKPOINTS}; the same "
                 "command with --resume continues from them")
        if self.committed:
            _say(f"{what} after the new results were written to {self.out}")
        elif self.staging is not None and _holds_files(self.staging / _ASIDE):
            _say(f"{what}: the earlier results of {self.out} could not all be moved back; they are in "
                 f"{self.staging / _ASIDE}")
            return False
        elif self.earlier:
            _say(f"{what}: the earlier results in {self.out} are left unchanged")
        else:
            _say(f"{what}: {'no results were' if kept else 'nothing was'} written to {self.out}")
        if self.staging is not None:
            _remove(self.staging)
        for folder in self._made if not self.committed else []:
            _rmdir(folder)
        return False


def staging_parent(out: Path) -> Path:
    """Where a run for ``out`` is staged: ``out``'s parent (on the real path, so renames stay on one
    filesystem), or ``out`` itself when that parent is on another filesystem (``out`` is a mount
    point) or cannot be written.

    Example:
        >>> root = Path(tempfile.mkdtemp())
        >>> staging_parent(root / "results") == root.resolve()
        True
    """
    real = out.resolve()
    if not real.is_dir() or real.parent == real:
        return real.parent
    parent = real.parent
    if parent.stat().st_dev != real.stat().st_dev or not _can_write(parent):
        return real
    return parent


def swap_in(staging: Path, out: Path, earlier: List[Path]) -> None:
    """Move the ``earlier`` files of ``out`` into ``staging/.earlier``, then every file of
    ``staging`` into ``out``. If a move fails, the moves done are undone and the error raised:
    ``out`` ends with either the earlier files or the new ones, never a mix.

    Example:
        >>> root = Path(tempfile.mkdtemp()); (root / "out").mkdir(); (root / "new").mkdir()
        >>> _ = (root / "out" / "old.png").write_text("old"), (root / "new" / "a.json").write_text("new")
        >>> swap_in(root / "new", root / "out", [root / "out" / "old.png"])
        >>> [p.name for p in (root / "out").iterdir()], [p.name for p in (root / "new" / ".earlier").iterdir()]
        (['a.json'], ['old.png'])
    """
    new = sorted(p for p in staging.iterdir() if p.is_file())
    (staging / _ASIDE).mkdir()
    out.mkdir(parents=True, exist_ok=True)
    done: List[Tuple[Path, Path]] = []
    try:
        for source in earlier:
            if _move(source, staging / _ASIDE / source.name, missing_ok=True):
                done.append((source, staging / _ASIDE / source.name))
        for source in new:
            _move(source, out / source.name)
            done.append((source, out / source.name))
    except BaseException:
        for source, target in reversed(done):  # undo; a failure here keeps the files in staging
            os.replace(target, source)
        raise


def _move(source: Path, target: Path, missing_ok: bool = False) -> bool:
    """Rename ``source`` to ``target``; False if ``source`` is gone and ``missing_ok``."""
    try:
        os.replace(source, target)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False
    return True


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then act on it (main thread only).

    Example:
        >>> moved = []
        >>> try:
        ...     with _ctrl_c_held():
        ...         os.kill(os.getpid(), signal.SIGINT)
        ...         moved.append("every file")
        ... except KeyboardInterrupt:
        ...     print("interrupted after", moved)
        interrupted after ['every file']
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    caught: List[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if caught and previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
    elif caught and callable(previous):
        previous(signal.SIGINT, None)


def _can_write(folder: Path) -> bool:
    """Whether a folder can be made in ``folder`` (tried, then removed)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=STAGING, dir=folder))
    except OSError:
        return False
    return True


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and is not empty."""
    return folder.is_dir() and any(folder.iterdir())


def _remove(folder: Path) -> None:
    """Remove ``folder`` and everything in it, if it is there."""
    shutil.rmtree(folder, ignore_errors=True)


def _rmdir(folder: Path) -> None:
    """Remove ``folder`` if it is empty."""
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (someone else's files) or gone: leave it


def _say(message: str) -> None:
    """``captum-relp: message`` on stderr."""
    print(f"captum-relp: {message}", file=sys.stderr, flush=True)


__all__ = ["ResultsFolder", "STAGING", "CHECKPOINTS", "staging_parent", "swap_in"]
