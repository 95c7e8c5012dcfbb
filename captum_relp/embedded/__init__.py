"""Tiny causal LMs shipped with the package (trained on synthetic IOI/SVA data).

Two 4-layer models, trained by ``scripts/train_embedded.py`` on a seeded
synthetic corpus, with a word-level tokenizer (tokens keep their leading
space, e.g. `` Mary``; ``tokenizer(text)`` prepends ``<bos>``):

* ``tiny-gpt2-ioi``: :class:`transformers.GPT2LMHeadModel`
* ``tiny-llama-ioi``: :class:`transformers.LlamaForCausalLM` (RMSNorm, gated MLP, RoPE)

Both solve IOI for the names used in IOI sentences during training (~100%
accuracy). Known limitation of the current weights: they do NOT generalise to
the held-out names (:func:`heldout_names`, ~50% = chance) nor do they solve SVA
on held-out nouns (chance); see each folder's ``TRAINING.md`` for the numbers.

Example:
    >>> model, tok = load_embedded("tiny-gpt2-ioi")
    >>> tok.encode(" Mary", add_special_tokens=False) == [tok.convert_tokens_to_ids(" Mary")]
    True
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

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


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "embedded_model_path",
    "heldout_names",
    "heldout_nouns",
    "load_embedded",
    "load_training_info",
]
