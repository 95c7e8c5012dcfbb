"""Converted model folders that are complete or absent, never half written.

A folder is written aside (a hidden staging folder next to its place), closed by a record of
its files (bytes and sha256) written last, checked against that record, and renamed into place;
an older folder in that place is first renamed away and removed only after. An interrupted
write or removal therefore leaves either the old complete folder, the new complete one, or no
folder, plus hidden leftovers that the next write removes. A folder without its record, or whose
files disagree with it (e.g. a truncated weights file), is reported by :func:`folder_problem`.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> staging = staging_folder(root / "model")
    >>> _ = (staging / "config.json").write_text("{}")
    >>> _ = (staging / "model.safetensors").write_bytes(b"weights")
    >>> sorted(write_record(staging))
    ['config.json', 'model.safetensors']
    >>> install(staging, root / "model") == root / "model", folder_problem(root / "model")
    (True, None)
    >>> _ = (root / "model" / "model.safetensors").write_bytes(b"weig")  # truncated afterwards
    >>> folder_problem(root / "model")
    'model.safetensors has 4 bytes, expected 7'
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Optional


RECORD = "captum-relp-complete.json"
"""Written last into a converted folder: ``{"files": {name: {"bytes", "sha256"}}}``."""

_STALE_SECONDS = 3600.0


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Example:
        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> file_sha256(Path(f.name))[:12]
        'ba7816bf8f01'
        >>> os.remove(f.name)
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def staging_folder(target: Path) -> Path:
    """A new hidden folder next to ``target`` (same file system, so it can be renamed into place).

    Example:
        >>> import tempfile
        >>> staging_folder(Path(tempfile.mkdtemp()) / "model").name.startswith(".model.partial-")
        True
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:12]}")
    staging.mkdir()  # the usual permissions (umask), not mkdtemp's owner-only ones
    return staging


def write_record(folder: Path) -> Dict[str, Dict[str, object]]:
    """Record every file of ``folder`` (bytes, sha256) in :data:`RECORD`, written last and atomically.

    Returns:
        ``{relative path: {"bytes": int, "sha256": str}}``.
    """
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORD}
    partial = folder / (RECORD + ".partial")
    partial.write_text(json.dumps({"files": files}, indent=1))
    os.replace(partial, folder / RECORD)
    return files


def _record(folder: Path) -> Optional[Dict[str, Dict[str, object]]]:
    try:
        files = json.loads((folder / RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def folder_problem(folder: Path, checksums: bool = False) -> Optional[str]:
    """What is wrong with a converted folder, or ``None`` when it is complete.

    Args:
        folder: the folder.
        checksums: also compare every file's sha256 with the record (reads every byte);
            by default only their sizes are compared.

    Returns:
        ``None``, or a short reason (``"missing"``, ``"no record ..."``, a file missing or of
        another size or sha256 than recorded).
    """
    if not folder.is_dir():
        return "missing"
    files = _record(folder)
    if files is None:
        return f"no readable {RECORD} (the conversion did not finish, or an older version wrote it)"
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        return f"{RECORD} lists no config.json or no weights"
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, expected {entry.get('bytes')}"
        if checksums and file_sha256(path) != entry.get("sha256"):
            return f"{name} has another sha256 than recorded ({entry.get('sha256')})"
    return None


def remove_leftovers(target: Path) -> None:
    """Remove what interrupted writes left next to ``target``: old folders, and staging folders
    untouched for an hour (a younger one may belong to a conversion still running)."""
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(f".{target.name}.*-*"):
        stale = path.name.startswith(f".{target.name}.old-") or time.time() - path.stat().st_mtime > _STALE_SECONDS
        if path.is_dir() and stale:
            shutil.rmtree(path, ignore_errors=True)


def install(staging: Path, target: Path) -> Path:
    """Check ``staging`` against its record and rename it to ``target``, replacing an older folder safely.

    Raises:
        OSError: when ``staging`` is incomplete (it is not installed).
    """
    problem = folder_problem(staging, checksums=True)
    if problem is not None:
        raise OSError(f"the converted folder {staging} is incomplete ({problem}); it was not installed")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


def check_writable(folder: Path, fix: str) -> None:
    """Create ``folder`` and a file in it (removed again): a clear error, with ``fix``, if that fails.

    Example:
        >>> check_writable(Path("/proc/no-such-dir"), "set X")
        Traceback (most recent call last):
        ...
        OSError: the cache folder /proc/no-such-dir cannot be written (No such file or directory); set X
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".captum-relp-probe-"):
            pass
    except OSError as error:
        raise OSError(f"the cache folder {folder} cannot be written ({error.strerror or error}); "
                              f"{fix}") from error


__all__ = ["RECORD", "check_writable", "file_sha256", "folder_problem", "install", "remove_leftovers",
           "staging_folder", "write_record"]
