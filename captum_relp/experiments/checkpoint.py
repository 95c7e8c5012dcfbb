"""Per-batch checkpoints of long runs: each finished batch is saved, a resumed run reuses it.

A :class:`Checkpoint` is a folder holding one ``.npz`` file per finished piece of work (for the
experiments: one batch of one method) and the *fingerprint* of the run that made them
(``NAME.checkpoint.json``): everything that decides the results, i.e. the model's weights
(:func:`model_digest`), the pairs as tokenized, the methods, rules, batch sizes, seed and the
versions of captum-relp and torch (:func:`run_fingerprint`).

* :meth:`Checkpoint.open` starts a checkpoint or resumes one. A checkpoint that is there is
  reused only when ``resume`` is set *and* its fingerprint is this run's; another fingerprint
  raises :class:`CheckpointMismatch` naming the fields that differ, so the results of two
  configurations are never mixed. Without ``resume`` a checkpoint that is there is an error
  (:meth:`Checkpoint.discard` removes it first, to start again).
* :meth:`Checkpoint.save` writes an entry to a temporary file and renames it into place: an
  interrupted run leaves whole entries or none.
* :func:`checkpointed` runs one piece of scoring, or reads it back when it was saved.

Example:
    >>> import tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> first = Checkpoint(folder, "demo")
    >>> first.open({"batch_size": 4})
    0
    >>> _ = first.save("AtP_000000", {"scores": np.arange(3.0)})
    >>> again = Checkpoint(folder, "demo", resume=True)
    >>> again.open({"batch_size": 4}), again.load("AtP_000000")["scores"].tolist()
    (1, [0.0, 1.0, 2.0])
    >>> Checkpoint(folder, "demo", resume=True).open({"batch_size": 8})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    captum_relp.experiments.checkpoint.CheckpointMismatch: the checkpoint in ... was made by a run of another configuration: batch_size 4 there, 8 now
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

SUFFIX = ".checkpoint.json"
"""The fingerprint file of a checkpoint is ``NAME`` followed by this."""
_SHOWN = 120  # longer fingerprint values are stored as a sha256 digest


class CheckpointMismatch(ValueError):
    """A checkpoint made by a run of another configuration.

    Attributes:
        folder: the checkpoint's folder.
        differences: ``{field: (saved, now)}`` (``None`` for a field one side lacks).
    """

    def __init__(self, folder: Path, differences: Mapping[str, Tuple[Any, Any]]) -> None:
        self.folder, self.differences = Path(folder), dict(differences)
        shown = "; ".join(f"{k} {_short(a)} there, {_short(b)} now" for k, (a, b) in self.differences.items())
        super().__init__(f"the checkpoint in {self.folder} was made by a run of another configuration: {shown}")


class Checkpoint:
    """The finished entries of one run, in ``folder``, with the run's fingerprint.

    Args:
        folder: where the entries are saved (made when the first is).
        name: prefix of its files (several checkpoints can share a folder).
        resume: whether :meth:`open` may reuse the entries that are there.
        compress: save entries with ``numpy.savez_compressed`` (smaller, slower).

    Example:
        >>> import tempfile
        >>> Checkpoint(Path(tempfile.mkdtemp()), "ioi").exists()
        False
    """

    def __init__(self, folder: Path, name: str = "run", resume: bool = False, compress: bool = False) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ValueError(f"Checkpoint name must be letters, digits and _.+-, got {name!r}")
        self.folder, self.name, self.resume, self.compress = Path(folder), name, resume, compress
        self.fingerprint: Optional[Dict[str, Any]] = None
        self.reused = 0

    @property
    def fingerprint_path(self) -> Path:
        """``folder/NAME.checkpoint.json``."""
        return self.folder / f"{self.name}{SUFFIX}"

    def entries(self) -> List[str]:
        """The keys of the saved entries, sorted."""
        if not self.folder.is_dir():
            return []
        prefix = f"{self.name}_"
        return sorted(p.name[len(prefix):-4] for p in self.folder.glob(f"{self.name}_*.npz")
                      if not p.name.endswith(".tmp.npz"))

    def exists(self) -> bool:
        """Whether a fingerprint or an entry of this checkpoint is in ``folder``."""
        return self.fingerprint_path.is_file() or bool(self.entries())

    def open(self, fingerprint: Mapping[str, Any]) -> int:
        """Start this checkpoint, or resume it; returns the number of entries reused.

        Raises:
            CheckpointMismatch: ``resume`` and the saved fingerprint is another run's.
            ValueError: a checkpoint is there and ``resume`` is not set, or entries are there
                without a fingerprint.
        """
        fingerprint = json.loads(json.dumps(_plain(dict(fingerprint)), sort_keys=True))
        if self.exists():
            if not self.resume:
                raise ValueError(f"{self.folder} holds the checkpoint {self.name!r} of an unfinished run "
                                 f"({len(self.entries())} entries): resume it, or discard it to start again")
            if not self.fingerprint_path.is_file():
                raise ValueError(f"{self.folder} holds entries of {self.name!r} but no {self.fingerprint_path.name}: "
                                 "they cannot be checked against this run; discard them to start again")
            saved = json.loads(self.fingerprint_path.read_text())
            differences = {k: (saved.get(k), fingerprint.get(k)) for k in sorted(set(saved) | set(fingerprint))
                           if saved.get(k) != fingerprint.get(k)}
            if differences:
                raise CheckpointMismatch(self.folder, differences)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.fingerprint_path, lambda path: path.write_text(json.dumps(fingerprint, indent=1)))
        self.fingerprint = fingerprint
        self.reused = len(self.entries())
        return self.reused

    def path(self, key: str) -> Path:
        """The file of entry ``key``."""
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", key):
            raise ValueError(f"checkpoint keys are letters, digits and _.+-, got {key!r}")
        return self.folder / f"{self.name}_{key}.npz"

    def load(self, key: str) -> Optional[Dict[str, np.ndarray]]:
        """The arrays saved under ``key``, or ``None`` if that entry is not saved."""
        self._check_open()
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}

    def save(self, key: str, arrays: Mapping[str, Any]) -> Path:
        """Save ``arrays`` under ``key`` (written to a temporary file, then renamed into place)."""
        self._check_open()
        final = self.path(key)
        write = np.savez_compressed if self.compress else np.savez
        _write_atomic(final, lambda path: write(path, **{k: np.asarray(v) for k, v in arrays.items()}))
        return final

    def discard(self) -> None:
        """Remove the fingerprint and every entry of this checkpoint (the folder too, once empty)."""
        for path in [self.fingerprint_path, *(self.path(k) for k in self.entries())]:
            path.unlink(missing_ok=True)
        for leftover in self.folder.glob(f"{self.name}_*.tmp.npz") if self.folder.is_dir() else []:
            leftover.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # other files (another checkpoint's) or gone
        self.fingerprint = None

    def _check_open(self) -> None:
        if self.fingerprint is None:
            raise RuntimeError(f"Checkpoint {self.name!r}: call open(fingerprint) before load or save")


def checkpointed(checkpoint: Optional[Checkpoint], key: str,
                 compute: Callable[[], List[torch.Tensor]]) -> Tuple[List[torch.Tensor], float]:
    """The float32 CPU tensors ``compute()`` returns and its wall time, read back from
    ``checkpoint`` when the entry ``key`` is saved there (else computed, then saved).

    Example:
        >>> import tempfile
        >>> calls = []
        >>> def score():
        ...     calls.append(1)
        ...     return [torch.tensor([1.5, 2.0])]
        >>> store = Checkpoint(Path(tempfile.mkdtemp()), "demo"); _ = store.open({})
        >>> first, _ = checkpointed(store, "AtP_000000", score)
        >>> again, _ = checkpointed(store, "AtP_000000", score)
        >>> torch.equal(first[0], again[0]), len(calls)
        (True, 1)
    """
    if checkpoint is not None:
        saved = checkpoint.load(key)
        if saved is not None:
            count = int(saved["count"])
            return [torch.from_numpy(saved[f"scores_{i}"]) for i in range(count)], float(saved["seconds"])
    began = time.perf_counter()
    scores = [s.detach().float().cpu() for s in compute()]
    seconds = time.perf_counter() - began
    if checkpoint is not None:
        checkpoint.save(key, {"count": len(scores), "seconds": seconds,
                              **{f"scores_{i}": s.numpy() for i, s in enumerate(scores)}})
    return scores, seconds


def entry_key(method: str, start: int) -> str:
    """The key of one method's batch starting at row ``start`` (a file-name-safe method name).

    Example:
        >>> entry_key("RelP (calibrated)", 16)
        'RelP-calibrated_000016'
    """
    return re.sub(r"[^A-Za-z0-9+.]+", "-", method).strip("-") + f"_{start:06d}"


def model_digest(model: nn.Module) -> str:
    """A sha256 of the model's type and of every parameter and buffer: name, shape, dtype,
    the sum and up to 4096 evenly spaced values (cheap for large models, and any retraining or
    fine-tuning changes it).

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> model_digest(a) == model_digest(a), model_digest(a) == model_digest(b)
        (True, False)
    """
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].double()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{float(flat.double().sum())!r}".encode())
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(model: nn.Module, **settings: Any) -> Dict[str, Any]:
    """The fingerprint of a run: ``settings`` (tensors, dataclasses and long values as sha256
    digests) with the model's digest, dtype, device type and attention implementation and the
    versions of captum-relp and torch.

    Example:
        >>> fingerprint = run_fingerprint(nn.Linear(2, 2), batch_size=4, ids=torch.arange(100))
        >>> fingerprint["batch_size"], fingerprint["ids"][:11], sorted(fingerprint)[:3]
        (4, 'int64[100]:', ['attention', 'batch_size', 'captum_relp'])
    """
    from .. import __version__

    parameter = next(model.parameters(), None)
    config = getattr(model, "config", None)
    found = {"captum_relp": __version__, "torch": torch.__version__, "model": model_digest(model),
             "dtype": str(parameter.dtype) if parameter is not None else None,
             "device": parameter.device.type if parameter is not None else None,
             "attention": getattr(config, "_attn_implementation", None)}
    for key, value in settings.items():
        if key in found:
            raise ValueError(f"run_fingerprint: setting {key!r} is one of the fields it records itself")
        plain = _plain(value)
        text = json.dumps(plain, sort_keys=True)
        found[key] = plain if len(text) <= _SHOWN else "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return found


def _plain(value: Any) -> Any:
    """``value`` as JSON data: tensors and arrays as a digest of their bytes, dataclasses as dicts."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        array = value.detach().cpu().numpy() if torch.is_tensor(value) else value
        return f"{array.dtype}{list(array.shape)}:" + hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"run_fingerprint: cannot record a {type(value).__name__} (give tensors, numbers, "
                    "strings, dataclasses or lists and dicts of them)")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _write_atomic(final: Path, write: Callable[[Path], Any]) -> None:
    temporary = final.with_name(f"{final.stem}.tmp{final.suffix}")
    try:
        write(temporary)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


__all__ = ["Checkpoint", "CheckpointMismatch", "checkpointed", "entry_key", "model_digest", "run_fingerprint",
           "SUFFIX"]
