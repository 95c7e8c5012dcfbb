"""Logits only where the metric reads them.

A causal language model's unembedding maps every position to ``V`` logits, although a
``target=`` or :class:`~captum_relp.metrics.LogitDiff` metric reads one position per row.
:func:`metric_logits` hooks the unembedding of a Hugging Face causal LM and feeds it
only the final hidden state of each row at the position the metric reads, so the model
returns logits of shape ``(rows, V)`` instead of ``(rows, T, V)``; the metrics accept
such 2-D logits as they are. The values are those of the full-logits path (the same
per-position computation on fewer rows).

Positions are known when the metric is ``target=`` (the last real position of each row,
from the ``attention_mask`` under right padding) or a metric that declares them: an
object with ``reads_final_logits = True`` and a ``positions`` attribute (None: the last
position), such as :class:`~captum_relp.metrics.LogitDiff` and
:class:`~captum_relp.metrics.ProbDiff`. A plain callable metric gets ``(rows, T', V)`` logits
computed only at the positions it reads, given as ``logit_positions`` or found on probes
(:mod:`captum_relp._read_positions`); when they cannot be found exactly it gets the full
logits. :func:`without_logits` skips the unembedding in passes that evaluate no metric.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._read_positions import read_positions
from ._unwrap import is_hf_model
from .metrics import MetricEvaluator, last_positions
from .metrics import tile_rows

_STATE = {"enabled": True}
ROW_ALIGN = 8
"""Gathered rows are padded to a multiple of this before the unembedding (BLAS row blocks)."""
LAST_REAL = "last-real"
"""Position spec: the last real token of each row (from the attention mask)."""


@contextmanager
def full_logits() -> Iterator[None]:
    """Compute logits at every position inside the block (the reference path).

    Example:
        >>> with full_logits():
        ...     pass
    """
    previous = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = previous


def metric_positions(evaluator: MetricEvaluator) -> Optional[Any]:
    """The positions the evaluator reads: :data:`LAST_REAL`, ``None`` (last), ids, or ``False``.

    ``False`` means unknown (a metric that does not declare its positions).

    Example:
        >>> from captum_relp.metrics import LogitDiff
        >>> metric_positions(MetricEvaluator(2, metric=LogitDiff(1, 2, positions=[3, 4])))
        [3, 4]
        >>> metric_positions(MetricEvaluator(2, target=5))
        'last-real'
    """
    if evaluator.metric is None:
        return LAST_REAL if evaluator.target is not None else False
    if getattr(evaluator.metric, "reads_final_logits", False):
        return getattr(evaluator.metric, "positions", None)
    return False


def is_causal_lm(model: Any) -> bool:
    """True for a Hugging Face model with a causal language-modelling head.

    Example:
        >>> is_causal_lm(torch.nn.Linear(2, 2))
        False
    """
    if not is_hf_model(model):
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def can_slice_logits(forward_func: Callable, evaluator: MetricEvaluator,
                     layers: Sequence[nn.Module] = ()) -> bool:
    """Whether :func:`metric_logits` would slice: causal LM, known positions, head not attributed."""
    return metric_positions(evaluator) is not False and _free_head(forward_func, layers) is not None


def _free_head(forward_func: Callable, layers: Sequence[nn.Module]) -> Optional[nn.Module]:
    """The unembedding of a causal LM when slicing is on and no attributed layer is (in) it."""
    if not _STATE["enabled"] or not is_causal_lm(forward_func):
        return None
    head = forward_func.get_output_embeddings()  # type: ignore[union-attr]
    if not isinstance(head, nn.Module):
        return None
    inside = {id(m) for m in head.modules()}
    attributed = any(id(layer) in inside or any(id(m) == id(head) for m in layer.modules())
                     for layer in layers)
    return None if attributed else head


def gather_rows(hidden: Tensor, spec: Any, mask: Optional[Tensor], offset: int = 0,
                full_len: Optional[int] = None) -> Tensor:
    """``hidden[r, position(r) - offset]`` for each row: ``(rows, T, d)`` -> ``(rows, d)``.

    ``full_len`` is the sequence length positions refer to (``offset + T`` by default);
    ``mask`` has one row per example (tiled over the rows of ``hidden``).

    Example:
        >>> gather_rows(torch.arange(6.0).reshape(1, 3, 2), None, None)
        tensor([[4., 5.]])
    """
    rows, length = hidden.shape[0], hidden.shape[1]
    full_len = offset + length if full_len is None else full_len
    if spec == LAST_REAL:
        base = mask.shape[0] if mask is not None else rows
        positions = last_positions(mask, base, full_len, hidden.device)
        positions = tile_rows(positions, rows, hidden.device)
    elif spec is None:
        positions = torch.full((rows,), full_len - 1, dtype=torch.long, device=hidden.device)
    else:
        positions = tile_rows(spec, rows, hidden.device) % full_len
    return hidden[torch.arange(rows, device=hidden.device), positions - offset]


@contextmanager
def metric_logits(forward_func: Callable, evaluator: MetricEvaluator,
                  layers: Sequence[nn.Module] = (), offset: int = 0) -> Iterator[bool]:
    """Inside the block, the model computes logits only at the positions the metric reads.

    Yields whether slicing is active. ``offset``: the first position of the sequence
    fed to the model (a suffix run on a key/value cache); positions stay absolute.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)).eval()
        >>> with metric_logits(model, MetricEvaluator(1, target=3)) as active:
        ...     logits = model(torch.tensor([[1, 2, 3]])).logits
        >>> active, tuple(logits.shape)
        (True, (1, 11))
    """
    if not can_slice_logits(forward_func, evaluator, layers):
        with _plain_metric_logits(forward_func, evaluator, layers, offset) as active:
            yield active
        return
    spec = metric_positions(evaluator)
    state: dict = {}

    def on_model(module, args, kwargs):
        state["skip"] = bool(kwargs.get("logits_to_keep"))  # the caller already slices
        state["mask"] = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        state["length"] = None if ids is None else ids.shape[1]

    def on_head(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or state.get("skip"):
            return None
        mask = state.get("mask")
        full_len = mask.shape[1] if mask is not None else offset + hidden.shape[1]
        rows = gather_rows(hidden, spec, mask, offset, full_len)
        state["rows"] = rows.shape[0]
        pad = -rows.shape[0] % ROW_ALIGN
        if pad:  # whole row blocks: each row's logits do not depend on the number of rows
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        return (rows,) + tuple(args[1:])

    def after_head(module, args, output):
        rows = state.pop("rows", None)
        if rows is None or not isinstance(output, Tensor) or output.shape[0] == rows:
            return None
        return output[:rows]

    head = forward_func.get_output_embeddings()  # type: ignore[union-attr]
    handles = [forward_func.register_forward_pre_hook(on_model, with_kwargs=True),  # type: ignore[union-attr]
               head.register_forward_pre_hook(on_head), head.register_forward_hook(after_head)]
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()


def _head_rows(hidden: Tensor) -> Tuple[Tensor, int]:
    """``(n, d)`` rows padded to whole :data:`ROW_ALIGN` blocks, and ``n``."""
    count = hidden.shape[0]
    pad = -count % ROW_ALIGN
    if pad:  # whole row blocks: each row's logits do not depend on the number of rows
        hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
    return hidden, count


@contextmanager
def _plain_metric_logits(forward_func: Callable, evaluator: MetricEvaluator,
                         layers: Sequence[nn.Module], offset: int) -> Iterator[bool]:
    """For a plain callable metric: logits only at the positions it reads (``logit_positions``
    or found on a probe, :mod:`captum_relp._read_positions`), handed to it as ``(rows, T', V)``
    (``T' = T``, or the suffix from its first read position when the probes show it gives the
    same values there) whose other positions repeat the single read position or are NaN. Full
    logits when the positions are unknown."""
    head = _free_head(forward_func, layers)
    if head is None or evaluator.metric is None or not isinstance(getattr(head, "weight", None), Tensor):
        yield False
        return
    state: dict = {}

    def on_model(module, args, kwargs):
        state["skip"] = bool(kwargs.get("logits_to_keep"))

    def on_head(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or state.get("skip") or not hidden.shape[0]:
            return None
        weight = head.weight
        found = read_positions(evaluator, offset + hidden.shape[1], weight.shape[0], weight.dtype, weight.device)
        if found is None or found[1] < offset:  # a suffix run shows the metric no earlier position
            return None
        positions, begin = found
        local = [p - begin for p in positions]  # positions in the logits the metric is shown
        rows, index = _head_rows(hidden[:, [p - offset for p in positions]].reshape(-1, hidden.shape[2]))
        state["layout"] = (hidden.shape[0], offset + hidden.shape[1] - begin, local, index)
        return (rows,) + tuple(args[1:])

    def after_head(module, args, output):
        layout = state.pop("layout", None)
        if layout is None or not isinstance(output, Tensor) or not output.shape[0]:
            return None
        rows, length, local, count = layout
        picked = output[:count].reshape(rows, len(local), output.shape[-1])
        if len(local) == length:  # the metric is shown exactly the positions computed
            return picked
        if len(local) == 1:  # a view: no (rows, T, V) tensor is allocated
            return picked.expand(rows, length, output.shape[-1])
        filled = torch.cat([picked, picked.new_full((rows, 1, output.shape[-1]), math.nan)], dim=1)
        where = torch.full((length,), len(local), dtype=torch.long, device=output.device)
        where[local] = torch.arange(len(local), device=output.device)
        return filled[:, where]

    handles = [forward_func.register_forward_pre_hook(on_model, with_kwargs=True),  # type: ignore[union-attr]
               head.register_forward_pre_hook(on_head), head.register_forward_hook(after_head)]
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def without_logits(forward_func: Callable, layers: Sequence[nn.Module] = ()) -> Iterator[bool]:
    """Inside the block, a causal LM computes no logits (its unembedding gets zero rows): for
    passes that only record activations, such as the corrupt run of RelP and AtP. Yields
    whether it is active (a Hugging Face causal LM whose head is not attributed).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)).eval()
        >>> with without_logits(model) as active:
        ...     logits = model(torch.tensor([[1, 2, 3]])).logits
        >>> active, tuple(logits.shape)
        (True, (0, 3, 11))
    """
    head = _free_head(forward_func, layers)
    if head is None:
        yield False
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:0],) + tuple(args[1:]))
    try:
        yield True
    finally:
        handle.remove()


__all__ = ["LAST_REAL", "full_logits", "metric_positions", "is_causal_lm", "can_slice_logits",
           "gather_rows", "metric_logits", "without_logits"]
