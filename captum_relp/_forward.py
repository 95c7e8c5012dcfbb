"""Calling the model, shared by every attribution class so RelP, AtP, AP and IG all call it the
same way (the metric they evaluate on its output is in :mod:`captum_relp.metrics`).

**The module behind what a user passes** (the one place that finds it): nnsight objects
hold it in ``_module``, ``DistributedDataParallel``/``DataParallel`` in ``module``, a
``torch.compile``\\ d module in ``_orig_mod``, a bound ``forward`` in ``__self__``; hooks,
submodules and the Hugging Face config come from it. Duck-typed: neither nnsight nor a
process group is needed.

**Arguments and output**: extra forward arguments, the output tensor (``.logits`` of a
Hugging Face model) and token ids checked against the vocabulary.

**Logits only where the metric reads them.** :func:`metric_logits` hooks the unembedding
of a Hugging Face causal LM and feeds it only the final hidden states at the positions the
metric reads: ``(rows, V)`` logits for ``target=`` (the last real position of each row,
from the ``attention_mask`` under right padding) or a metric that declares its positions
(``reads_final_logits = True`` and ``positions``, None: the last one), such as
:class:`~captum_relp.metrics.LogitDiff`; ``(rows, T', V)`` for a plain callable, at the
positions given as ``logit_positions`` or found on probes (:mod:`captum_relp._read_positions`),
full logits when they cannot be found exactly. The values are those of the full-logits
path (the same per-position computation on fewer rows). :func:`without_logits` skips the
unembedding in passes that evaluate no metric.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._hooks import hooks_removed
from ._plain_logits import head_rows, plain_metric_logits
from .metrics import MetricEvaluator, last_positions, tile_rows

LAST_REAL = "last-real"
"""Position spec: the last real token of each row (from the attention mask)."""

WRAPPER_TYPES = (nn.parallel.DistributedDataParallel, nn.DataParallel)
_STATE = {"enabled": True}


def unwrap_model(obj: Any, keep_bound: bool = False) -> Any:
    """The torch module inside an nnsight model/envoy, a (Distributed)DataParallel wrapper,
    a ``torch.compile``\\ d module or (unless ``keep_bound``) a bound method of a module.

    Anything else (a module, a plain function, ``None``) is returned as it is.

    Args:
        obj: A model, layer or callable.
        keep_bound: keep a bound method of an uncompiled module as it is (it is what the
            user asked to call); the bound ``forward`` of a compiled module is always
            unwrapped, because layer hooks and rules act on the original modules.

    Returns:
        The innermost wrapped ``nn.Module``, or ``obj``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
        >>> class Envoy:  # what nnsight hands out
        ...     def __init__(self, module): self._module = module
        >>> unwrap_model(Envoy(net)) is net, unwrap_model(net.forward) is net
        (True, True)
    """
    for _ in range(8):  # wrappers of wrappers, bounded
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, WRAPPER_TYPES):
            obj = obj.module
        elif not isinstance(obj, nn.Module) and isinstance(getattr(obj, "_module", None), nn.Module):
            obj = obj._module
        elif isinstance(getattr(obj, "_orig_mod", None), nn.Module):
            obj = obj._orig_mod
        elif not isinstance(obj, nn.Module) and isinstance(owner, nn.Module) and (
                not keep_bound or isinstance(getattr(owner, "_orig_mod", None), nn.Module)):
            obj = owner
        else:
            return obj
    return obj


def unwrap_layers(layer: Any) -> Any:
    """:func:`unwrap_model` on a layer or on each entry of a list/tuple of layers.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> unwrap_layers([torch.nn.DataParallel(net[0]), net[1]]) == [net[0], net[1]]
        True
    """
    wrapped = unwrap_model(layer)
    if wrapped is not layer or isinstance(layer, nn.Module):
        return wrapped
    if isinstance(layer, (list, tuple)):
        return type(layer)(unwrap_model(entry) for entry in layer)
    return layer


def is_hf_model(module: Any) -> bool:
    """Whether ``module`` is a Hugging Face model, also behind any wrapper :func:`unwrap_model` removes.

    Example:
        >>> import torch
        >>> is_hf_model(torch.nn.Linear(1, 1))
        False
    """
    from transformers import PreTrainedModel  # a dependency; imported when first needed

    return isinstance(unwrap_model(module), PreTrainedModel)


def split_forward_args(
    forward_func: Callable, additional_forward_args: Any, model: Optional[nn.Module] = None
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Positional and keyword extra arguments.

    A dict is passed as keywords. For Hugging Face models a tuple's first tensor
    is taken as the ``attention_mask`` (their second positional argument is not
    the mask in every family).
    """
    if additional_forward_args is None:
        return (), {}
    if isinstance(additional_forward_args, dict):
        return (), dict(additional_forward_args)
    if not isinstance(additional_forward_args, tuple):
        additional_forward_args = (additional_forward_args,)
    if is_hf_model(forward_func) and additional_forward_args:
        first, *rest = additional_forward_args
        if rest:
            raise ValueError(
                "additional_forward_args: for a Hugging Face model pass (attention_mask,) or a "
                "dict of keyword arguments"
            )
        return (), {"attention_mask": first}
    return additional_forward_args, {}


def call_model(forward_func: Callable, inputs: Tuple[Tensor, ...], args: Tuple, kwargs: Dict) -> Tensor:
    """Run the model; a Hugging Face model's ``.logits`` is returned."""
    if is_hf_model(forward_func):
        kwargs = {"use_cache": False, **kwargs}
    output = forward_func(*inputs, *args, **kwargs)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, tuple) and not isinstance(output, Tensor):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"forward_func must return a tensor or an output with .logits, got {type(output)}")
    return output


def check_token_ids(model: Optional[nn.Module], tensors: Sequence[Any]) -> None:
    """Raise a ``ValueError`` naming the token ids outside the vocabulary of ``model``.

    Integer tensors among ``tensors`` are read as token ids when ``model`` has input
    embeddings (``get_input_embeddings()``, as Hugging Face models do); otherwise nothing
    is checked. An id outside the vocabulary would otherwise fail deep inside the
    embedding lookup (or, on some devices, read memory it should not).

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
        >>> check_token_ids(model, [torch.tensor([[1, 12, -1]])])
        Traceback (most recent call last):
        ...
        ValueError: token ids [-1, 12] are outside the vocabulary of GPT2LMHeadModel (size 10): ids must be in [0, 9]
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if get_embeddings is None:
        return
    vocab = getattr(get_embeddings(), "num_embeddings", None)
    if vocab is None:
        return
    for ids in tensors:
        if not isinstance(ids, Tensor) or ids.dtype not in _ID_DTYPES or not ids.numel():
            continue
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            values = sorted(set(bad.tolist()))
            more = f" and {len(values) - 10} more" if len(values) > 10 else ""
            raise ValueError(
                f"token ids {values[:10]}{more} are outside the vocabulary of {type(model).__name__} "
                f"(size {vocab}): ids must be in [0, {vocab - 1}]"
            )


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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
    if not is_hf_model(model) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
        with plain_metric_logits(forward_func, evaluator, _free_head(forward_func, layers), offset) as active:
            yield active
        return
    spec = metric_positions(evaluator)
    state: dict = {}

    def on_model(module, args, kwargs):
        state["skip"] = bool(kwargs.get("logits_to_keep"))  # the caller already slices
        state["mask"] = kwargs.get("attention_mask")

    def on_head(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or state.get("skip"):
            return None
        mask = state.get("mask")
        full_len = mask.shape[1] if mask is not None else offset + hidden.shape[1]
        rows, state["rows"] = head_rows(gather_rows(hidden, spec, mask, offset, full_len))
        return (rows,) + tuple(args[1:])

    def after_head(module, args, output):
        rows = state.pop("rows", None)
        if rows is None or not isinstance(output, Tensor) or output.shape[0] == rows:
            return None
        return output[:rows]

    head = forward_func.get_output_embeddings()  # type: ignore[union-attr]
    with hooks_removed() as handles:
        handles += [forward_func.register_forward_pre_hook(on_model, with_kwargs=True),  # type: ignore[union-attr]
                    head.register_forward_pre_hook(on_head), head.register_forward_hook(after_head)]
        yield True


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
    with hooks_removed() as handles:
        handles.append(head.register_forward_pre_hook(lambda module, args: (args[0][:0],) + tuple(args[1:])))
        yield True
