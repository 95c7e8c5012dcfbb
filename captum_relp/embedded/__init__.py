"""Tiny causal LMs shipped with the package (trained on synthetic IOI/SVA data).

Two 4-layer models, trained by ``scripts/train_embedded.py`` on a seeded
synthetic corpus, with a word-level tokenizer (tokens keep their leading
space, e.g. `` Mary``; ``tokenizer(text)`` prepends ``<bos>``):

* ``tiny-gpt2-ioi``: :class:`transformers.GPT2LMHeadModel`
* ``tiny-llama-ioi``: :class:`transformers.LlamaForCausalLM` (RMSNorm, gated MLP, RoPE)

Both solve IOI, also for names held out of the IOI sentences in training
(:func:`heldout_names`), and subject-verb agreement; each folder's ``TRAINING.md``
records the measured accuracies (e.g. held-out IOI 1.00 for ``tiny-gpt2-ioi`` and
0.985 for ``tiny-llama-ioi``). Each model ships sparse autoencoders for its residual,
attention and MLP outputs (:func:`load_embedded_saes`).

This module is the one place that resolves model names: :func:`load_model` takes a
shipped name, a fetched real model's name (``smollm2-135m``, see
:mod:`captum_relp.embedded.fetch`), a ``.gguf`` file (:mod:`captum_relp.embedded.gguf`),
a local ``save_pretrained`` directory or a hub name.

Example:
    >>> model, tok = load_embedded("tiny-gpt2-ioi")
    >>> tok.encode(" Mary", add_special_tokens=False) == [tok.convert_tokens_to_ids(" Mary")]
    True
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

EMBEDDED_MODELS: tuple[str, ...] = ("tiny-gpt2-ioi", "tiny-llama-ioi")
"""Names of the shipped models."""

DEFAULT_MODEL: str = "tiny-gpt2-ioi"
"""Model used when no name is given."""

_ROOT = Path(__file__).resolve().parent


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of an embedded model (loadable with ``from_pretrained``).

    Raises:
        ValueError: For an unknown name (the message lists the available ones).

    Example:
        >>> embedded_model_path("tiny-llama-ioi").name
        'tiny-llama-ioi'
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}"
        )
    path = _ROOT / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedded model files missing in {path}; "
            f"regenerate with scripts/train_embedded.py (see its docstring)"
        )
    return path


def is_embedded(name: Optional[str]) -> bool:
    """Whether ``name`` is ``None`` (the default model) or a shipped model's name.

    Example:
        >>> is_embedded(None), is_embedded("tiny-llama-ioi"), is_embedded("gpt2")
        (True, True, False)
    """
    return name is None or name in EMBEDDED_MODELS


def heldout_words(name: Optional[str], task: str = "ioi") -> Optional[list]:
    """Words held out of a shipped model's training sentences, for evaluation.

    ``ioi``: names; ``sva``: (singular, plural) noun pairs. ``None`` for models the
    package does not ship.

    Example:
        >>> len(heldout_words(None, "ioi")) > 2, heldout_words("gpt2")
        (True, None)
    """
    if not is_embedded(name):
        return None
    if task not in ("ioi", "sva"):
        raise ValueError(f"task must be 'ioi' or 'sva', got {task!r}")
    getter = heldout_names if task == "ioi" else heldout_nouns
    return getter(name or DEFAULT_MODEL) or None


def load_model(name: Optional[str] = None, device: Any = "cpu", dtype: Any = "float32") -> Tuple[Any, Any]:
    """Model (eval mode) and tokenizer by shipped name, fetched name, GGUF file, local directory or hub name.

    Args:
        name: a shipped model (default: :data:`DEFAULT_MODEL`), a fetched model
            (:data:`~captum_relp.embedded.fetch.FETCHABLE`, e.g. ``"smollm2-135m"``, after
            its one fetch command), a ``.gguf`` file (dequantized to ``dtype``, tokenizer
            from the file), a folder written by ``save_pretrained``, or a Hugging Face hub
            name (needs network access).
        device: where to put the model.
        dtype: a torch dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Raises:
        OSError: when the model cannot be loaded (the message says whether ``name``
            was a local directory; for a fetchable model not fetched yet, it gives the
            command that fetches it; for a GGUF file whose architecture transformers cannot
            dequantize, it names the architecture; for a damaged GGUF file, or one whose
            tensors disagree with its metadata, it names the tensor, what was expected and
            what was found; when the ``gguf`` extra is missing, it gives the install command).

    Example:
        >>> model, tokenizer = load_model(None, "cpu", "float32")
        >>> type(model).__name__
        'GPT2LMHeadModel'
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fetch import FETCHABLE, require_fetched
    from .gguf import is_gguf, load_gguf

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if is_gguf(name) and Path(str(name)).is_file():
        try:
            return load_gguf(name, device, torch_dtype)
        except (ValueError, ImportError) as error:  # damaged file, unsupported architecture, missing extra
            raise OSError(f"cannot load model {name!r}: {error}") from error
    if name in FETCHABLE:
        path = str(require_fetched(str(name)))
    elif is_embedded(name):
        path = str(embedded_model_path(name or DEFAULT_MODEL))
    else:
        path = str(name)
    if not is_embedded(name) and not Path(path).exists():
        _check_hub_name(str(name))
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise OSError(f"cannot load model {name!r}: the directory has no config.json "
                      "(save the model with save_pretrained, or give a shipped or hub name)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except Exception as error:  # OSError, ValueError, SafetensorError ...: all mean "cannot load"
        hint = "" if Path(path).exists() else " (not a local directory; hub names need network access)"
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise OSError(f"cannot load model {name!r}{hint}: {type(error).__name__}: {detail}") from error
    return model.to(device).eval(), tokenizer


def _check_hub_name(name: str) -> None:
    """Fail fast, before any hub retries, for a name that cannot be a reachable hub model."""
    import difflib
    import os
    import socket

    from .fetch import FETCHABLE
    from .gguf import is_gguf

    if is_gguf(name):
        raise OSError(f"cannot load model {name!r}: no such GGUF file")
    close = difflib.get_close_matches(name, EMBEDDED_MODELS + tuple(FETCHABLE), n=1, cutoff=0.7)
    if close:
        raise OSError(f"cannot load model {name!r}: not a shipped model or a local directory; "
                      f"did you mean {close[0]!r}?")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            offline = True
    if offline:
        raise OSError(f"cannot load model {name!r}: not a shipped model ({', '.join(EMBEDDED_MODELS)}) "
                      "or a local directory, and the Hugging Face hub is not reachable (offline)")


def load_embedded(
    name: str = DEFAULT_MODEL, device: Any = None, dtype: Any = None
) -> tuple[Any, Any]:
    """Load an embedded model and its tokenizer (model in eval mode).

    Args:
        name: One of :data:`EMBEDDED_MODELS`.
        device: Optional device to move the model to.
        dtype: Optional torch dtype for the model weights.

    Returns:
        ``(model, tokenizer)`` from ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Example:
        >>> model, tok = load_embedded()
        >>> model.training, model.config.n_layer
        (False, 4)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path(name)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@lru_cache(maxsize=None)
def _training_info(name: str) -> str:
    return (embedded_model_path(name) / "training.json").read_text()


def load_training_info(name: str = DEFAULT_MODEL) -> dict:
    """The ``training.json`` record of a model (command, seed, held-out words, metrics).

    Example:
        >>> info = load_training_info("tiny-gpt2-ioi")
        >>> info["arch"], info["metrics"]["ioi_train_names_acc"] >= 0.9
        ('gpt2', True)
    """
    return json.loads(_training_info(name))


def heldout_names(name: str = DEFAULT_MODEL) -> list[str]:
    """Names that never occurred in IOI sentences while training ``name``.

    Example:
        >>> len(heldout_names()) > 2
        True
    """
    return list(load_training_info(name)["heldout_names"])


def heldout_nouns(name: str = DEFAULT_MODEL) -> list[tuple[str, str]]:
    """(singular, plural) noun pairs that never occurred in SVA sentences in training.

    Example:
        >>> all(len(p) == 2 for p in heldout_nouns())
        True
    """
    return [tuple(p) for p in load_training_info(name)["heldout_nouns"]]


def embedded_saes_dir(name: str = DEFAULT_MODEL) -> Path:
    """``captum_relp/embedded/<name>/saes`` (the folder need not exist).

    Example:
        >>> embedded_saes_dir("tiny-gpt2-ioi").name
        'saes'
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    return _ROOT / name / "saes"


def load_embedded_sae_stats(name: str = DEFAULT_MODEL) -> dict:
    """The ``saes.json`` record (command, seed, per-dictionary FVE / L0 / dead fraction).

    Example:
        >>> sorted(load_embedded_sae_stats()["dictionaries"])[:2]
        ['attn_0', 'attn_1']
    """
    index = embedded_saes_dir(name) / "saes.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} missing; train with `python scripts/train_saes.py --model {name}`")
    return json.loads(index.read_text())


def load_embedded_saes(name: str = DEFAULT_MODEL) -> Dict[str, Any]:
    """The shipped dictionaries of an embedded model, keyed ``"resid_0"``, ``"attn_0"``, ...

    Raises:
        FileNotFoundError: If they were not trained (names the command to train them).

    Example:
        >>> saes = load_embedded_saes("tiny-gpt2-ioi")
        >>> len(saes), type(saes["mlp_0"]).__name__
        (12, 'SparseAutoencoder')
    """
    import torch

    from ..circuits.sae import load_dictionary_learning

    folder = embedded_saes_dir(name)
    keys: List[str] = list(load_embedded_sae_stats(name)["dictionaries"])
    out = {}
    for key in keys:
        file = folder / f"{key}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file} listed in {folder / 'saes.json'} is missing; retrain with "
                                    f"`python scripts/train_saes.py --model {name}`")
        out[key] = load_dictionary_learning(file).to(torch.float32)
    return out


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "embedded_model_path",
    "embedded_saes_dir",
    "heldout_names",
    "heldout_nouns",
    "heldout_words",
    "is_embedded",
    "load_embedded",
    "load_embedded_sae_stats",
    "load_embedded_saes",
    "load_model",
    "load_training_info",
]
