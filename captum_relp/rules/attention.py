"""AH-rule for attention (Ali et al. 2022): attention probabilities treated as constant.

Hugging Face models route attention through a registry of attention functions
(``AttentionInterface``) chosen by ``config._attn_implementation``. The rule
registers a wrapper ``relp_ah_<impl>`` around whatever implementation the model
uses (eager, sdpa, flash, ...) that passes *detached* queries and keys, so the
output ``A @ V`` is linear in ``V`` with ``A`` constant in the backward pass,
without materialising ``A``. The wrapper is also registered with
``AttentionMaskInterface`` under the same name (mapped to the original mask
function), otherwise causal and padding masks would be silently dropped.

Where the attention scores are computed in the module's own code (GPT-Neo, Bloom, Falcon,
MPT), :class:`DetachQKColumnsRule` detaches the query and key columns of the module's public
projections (GPT-Neo's ``q_proj`` and ``k_proj``; the fused ``query_key_value`` or ``Wqkv`` of
the others, in the layout the family table gives), so no private method is patched.

Forward values are unchanged (detaching copies no value); the probabilities, a function of
queries and keys only, then get no gradient.
"""
from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import Rule, UndoFn, UnsupportedModuleError

_PREFIX = "relp_ah_"
_CALLS = [0]  # calls of the AH wrappers, so a forward that never reached one is caught


def _original_attention(name: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ("eager", "None") or name not in ALL_ATTENTION_FUNCTIONS:
        modeling = sys.modules[type(module).__module__]
        eager = getattr(modeling, "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"AHRule: {type(module).__module__} has no eager_attention_forward to wrap"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _detached(query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return query.detach(), key.detach()


def _make_ah_attention(original_name: str, qk: Callable, prefix: str) -> Callable:
    def ah_attention(module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        _CALLS[0] += 1
        attention = _original_attention(original_name, module)
        query, key = qk(query, key)
        return attention(module, query, key, value, attention_mask, *args, **kwargs)

    ah_attention.__name__ = f"{prefix}{original_name}"
    return ah_attention


def register_ah_attention(original_name: str, qk: Optional[Callable] = None, prefix: str = _PREFIX) -> str:
    """Register the AH-rule wrapper of ``original_name`` and its mask function.

    Args:
        original_name: the attention implementation wrapped (``eager``, ``sdpa``, ...).
        qk: ``qk(query, key) -> (query, key)`` applied before the wrapped function (default:
            both detached, the AH-rule); another ``qk`` needs its own ``prefix``.
        prefix: the registered name's prefix.

    Returns the registered name.

    Example:
        >>> register_ah_attention("sdpa")
        'relp_ah_sdpa'
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if (qk is None) != (prefix == _PREFIX):
        raise ValueError(f"the prefix {prefix!r} is reserved for the detaching AH-rule" if qk is not None
                         else f"the detaching AH-rule is registered under {_PREFIX!r}, not {prefix!r}")
    name = f"{prefix}{original_name}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_ah_attention(original_name, qk or _detached, prefix))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        mask_key = original_name if original_name in ALL_MASK_ATTENTION_FUNCTIONS else "eager"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_key])
    return name


class AHRule(Rule):
    """AH-rule, applied to a whole Hugging Face model (it switches the attention function).

    Example:
        >>> from captum_relp.rules import AHRule
        >>> AHRule().name
        'ah'
    """

    name = "ah"

    def apply(self, module: nn.Module) -> UndoFn:
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise ValueError(
                f"AHRule needs a Hugging Face model with a config; {type(module).__name__} has none"
            )
        original = config._attn_implementation
        if original is not None and original.startswith(_PREFIX):
            return lambda: None
        config._attn_implementation = register_ah_attention(str(original or "eager"))
        return partial(setattr, config, "_attn_implementation", original)


def require_ah_calls(model: nn.Module) -> UndoFn:
    """Hooks that raise when a forward pass of ``model`` never called an AH wrapper: its attention
    does not go through ``AttentionInterface`` (on this transformers release), so the AH-rule would
    silently not be applied. Returns the undo function that removes them.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)  # no attention at all: the wrapper is never called
        >>> undo = require_ah_calls(net)
        >>> net(torch.ones(2))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        UnsupportedModuleError: the AH-rule (rules 'relp-ah') cannot be applied to Linear ...
        >>> undo()
    """
    start = [0]

    def before(module: nn.Module, args: Any) -> None:
        start[0] = _CALLS[0]

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if _CALLS[0] == start[0]:
            import transformers

            raise UnsupportedModuleError(
                f"the AH-rule (rules 'relp-ah') cannot be applied to {type(module).__name__} with transformers "
                f"{transformers.__version__}: its attention is computed in its own code, not through "
                f"transformers' AttentionInterface, so attention probabilities would not be held constant. "
                f"Use rules='relp', or a transformers release the family table supports")

    return _remover([model.register_forward_pre_hook(before).remove, model.register_forward_hook(after).remove])


def _remover(removers: Sequence[Callable[[], Any]]) -> UndoFn:
    """One undo function that calls every hook remover."""
    def undo() -> None:
        for remove in removers:
            remove()
    return undo


def qk_column_mask(layout: str, width: int, heads: int = 1, kv_heads: Optional[int] = None) -> torch.Tensor:
    """``True`` at the query and key columns of a projection output of ``width`` columns.

    Args:
        layout: one of :data:`~captum_relp.families.QK_LAYOUTS`: ``"all"``, ``"thirds"``
            (``[q | k | v]``), ``"per-head"`` (``[q k v]`` per head), ``"multi-query"``
            (``[q_1 .. q_H | k | v]``) or ``"grouped"`` (per key/value group: its queries, its key,
            its value).
        width: the projection's output width.
        heads: query heads; kv_heads: key/value heads (``"grouped"``).

    Returns:
        A bool tensor of shape ``(width,)``.

    Example:
        >>> qk_column_mask("per-head", 6, heads=2).int().tolist()  # head_dim 1: q k v q k v
        [1, 1, 0, 1, 1, 0]
        >>> qk_column_mask("grouped", 8, heads=4, kv_heads=2).int().tolist()  # q q k v q q k v
        [1, 1, 1, 0, 1, 1, 1, 0]
    """
    kv_heads = kv_heads or heads
    slots = {"all": 1, "thirds": 3, "per-head": 3 * heads, "multi-query": heads + 2,
             "grouped": heads + 2 * kv_heads}
    if layout not in slots:
        raise ValueError(f"layout must be one of {tuple(slots)}, got {layout!r}")
    if width % slots[layout] or (layout == "grouped" and heads % kv_heads):
        raise ValueError(f"a {layout!r} query/key/value projection with {heads} heads and {kv_heads} "
                         f"key/value heads cannot have {width} output columns")
    mask = torch.zeros(width, dtype=torch.bool)
    unit = width // slots[layout]
    if layout == "all":
        mask[:] = True
    elif layout == "thirds":
        mask[: 2 * unit] = True
    elif layout == "per-head":
        mask.view(heads, 3, unit)[:, :2] = True
    elif layout == "multi-query":
        mask[: (heads + 1) * unit] = True
    else:
        mask.view(kv_heads, heads // kv_heads + 2, unit)[:, :-1] = True
    return mask


def _detach_columns(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same values, no gradient where ``mask`` holds."""
    return torch.where(mask, output.detach(), output)


class DetachQKColumnsRule(Rule):
    """AH-rule for attention computed in a module's own code: the query and key columns of its
    projections are detached, so the probabilities (a function of queries and keys only) get no
    gradient while the values do.

    Only the module's public projection submodules are hooked (forward hooks), so the rule does
    not depend on how the module splits heads internally.

    Args:
        projections: child module name(s) whose outputs hold queries and keys.
        layout: where they sit in the output (:func:`qk_column_mask`); ``"all"`` for separate
            query and key projections.
        heads: query heads; kv_heads: key/value heads.

    Example:
        >>> import torch
        >>> m = torch.nn.Module(); m.Wqkv = torch.nn.Linear(2, 6)
        >>> undo = DetachQKColumnsRule("Wqkv").apply(m)  # [q | k | v]
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> m.Wqkv(x)[:, :4].sum().backward(); undo()
        >>> x.grad  # queries and keys carry no gradient
        tensor([[0., 0.]])
    """

    name = "ah"
    category = "attention"

    def __init__(self, projections: Union[str, Sequence[str]], layout: str = "thirds", heads: int = 1,
                 kv_heads: Optional[int] = None) -> None:
        self.projections = (projections,) if isinstance(projections, str) else tuple(projections)
        self.layout, self.heads, self.kv_heads = layout, heads, kv_heads
        self._masks: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        qk_column_mask(layout, 0, heads, kv_heads)  # checks the layout name

    def apply(self, module: nn.Module) -> UndoFn:
        return self.apply_with(module, _detach_columns)

    def apply_with(self, module: nn.Module,
                   function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> UndoFn:
        """Hook the projections of ``module`` so that each returns ``function(output, mask)``, with
        ``mask`` ``True`` at the query and key columns (:func:`qk_column_mask`). ``apply``
        detaches those columns; a function that drops their gradient only some of the time makes the
        rule switchable.

        Example:
            >>> import torch
            >>> m = torch.nn.Module(); m.Wqkv = torch.nn.Linear(2, 6)
            >>> zero = lambda output, mask: output.masked_fill(mask, 0)
            >>> undo = DetachQKColumnsRule("Wqkv").apply_with(m, zero)  # [q | k | v]
            >>> (m.Wqkv(torch.ones(1, 2)) == 0).int().tolist(); undo()  # queries and keys zeroed
            [[1, 1, 1, 1, 0, 0]]
        """
        children = [getattr(module, name, None) for name in self.projections]
        for name, child in zip(self.projections, children):
            if not isinstance(child, nn.Module):
                raise ValueError(f"{type(module).__name__} has no projection {name!r} to apply the AH-rule to")

        def hook(child: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return function(output, self._mask(output))

        return _remover([child.register_forward_hook(hook).remove for child in children])

    def _mask(self, output: torch.Tensor) -> torch.Tensor:
        key = (output.shape[-1], output.device)
        if key not in self._masks:  # one mask per width and device, not one per forward pass
            self._masks[key] = qk_column_mask(self.layout, key[0], self.heads, self.kv_heads).to(key[1])
        return self._masks[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.projections!r}, {self.layout!r})"
