"""Position-wise activation patching on a causal decoder, reusing the clean key/value cache.

In a causal model, patching the activation at position ``t`` cannot change anything
at positions ``< t``. :class:`PrefixCacheRunner` therefore runs each example's clean
prompt once with a key/value cache, and for a chunk of patched positions
``t0 <= t < t1`` feeds only the suffix ``x[t0:]`` on top of the cache truncated to
``t0``: ``(t1 - t0) * (T - t0)`` rows instead of ``(t1 - t0) * T``. Chunks are short
where suffixes are long (``ceil((T - t0) / 8)`` positions, at most
``internal_batch_size``) so that little work is repeated. The patched copies are
created at the layer, as in the plain path; the cache layers above it are expanded
to the copies when the copies reach them.

Used by :class:`~captum_relp.LayerActivationPatching` for Hugging Face causal LMs
(``granularity="position"`` or ``"head"``, ``reuse_prefix=True``) when the metric's
read position is known (see ``captum_relp._forward``); other models keep the
plain path.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .._forward import LAST_REAL, call_model, can_slice_logits, metric_logits, metric_positions
from .._hooks import layer_hooks
from ..metrics import MetricEvaluator, tile_rows

CHUNK_DIVISOR = 8
"""A chunk starting at ``t0`` patches at most ``ceil((T - t0) / CHUNK_DIVISOR)`` positions."""
ALIGN = 8
"""Suffix lengths ``T - t0`` are multiples of ``ALIGN`` (or ``T``): BLAS kernels then treat every
row as the full-length run does, so the effects are bitwise those of the plain path."""


def _cache_class():
    from transformers import DynamicCache

    class ExpandingCache(DynamicCache):
        """A DynamicCache whose batch-1 entries broadcast to the patched copies of a layer."""

        def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
            if layer_idx < len(self.layers):
                layer = self.layers[layer_idx]
                keys = getattr(layer, "keys", None)
                rows = key_states.shape[0]
                if isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[0] == 1 and rows > 1:
                    layer.keys = keys.expand(rows, *keys.shape[1:])
                    layer.values = layer.values.expand(rows, *layer.values.shape[1:])
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return ExpandingCache


def cache_argument(model: Any) -> str:
    """The keyword that passes a key/value cache to ``model``: ``cache`` where its forward takes
    it (newer transformers), else ``past_key_values``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> cache_argument(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
        'cache'
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixCacheRunner:
    """Runs patched suffixes of one example on its clean key/value cache.

    Args:
        forward_func (nn.Module): a Hugging Face causal LM.
        layers (list of nn.Module): the patched layers; ``flags`` their input/output flags.
        input_ids (Tensor): the clean ids ``(B, T)``.
        attention_mask (Tensor, optional): ``(B, T)``, right padding.
        evaluator (MetricEvaluator): the batch's metric.
    """

    def __init__(self, forward_func: nn.Module, layers: Sequence[nn.Module], flags: Sequence[bool],
                 input_ids: Tensor, attention_mask: Optional[Tensor], evaluator: MetricEvaluator) -> None:
        self.model, self.layers, self.flags = forward_func, list(layers), list(flags)
        self.input_ids, self.mask, self.evaluator = input_ids, attention_mask, evaluator
        self.cache_cls = _cache_class()
        self._clean: Dict[int, Any] = {}

    @staticmethod
    def applies(forward_func: Any, layers: Sequence[nn.Module], inputs: Tuple[Tensor, ...], args: Tuple,
                kwargs: Dict, evaluator: MetricEvaluator, granularity: str, reuse_prefix: bool) -> bool:
        """Whether the cached path is exact and possible for this call."""
        if not reuse_prefix or granularity not in ("position", "head") or args or len(inputs) != 1:
            return False
        if set(kwargs) - {"attention_mask"} or inputs[0].dim() != 2 or inputs[0].is_floating_point():
            return False
        window = getattr(getattr(forward_func, "config", None), "sliding_window", None)
        if window is not None and inputs[0].shape[1] >= window:
            return False  # sliding-window caches keep only the last window - 1 positions
        mask = kwargs.get("attention_mask")
        if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
            return False  # left padding or holes: keep the plain path
        return can_slice_logits(forward_func, evaluator, layers)

    def read_position(self, row: int) -> int:
        """The absolute position the metric reads for example ``row``."""
        spec, length = metric_positions(self.evaluator), self.input_ids.shape[1]
        if spec == LAST_REAL and self.mask is not None:
            return int(self.mask[row].long().nonzero().max()) if self.mask[row].any() else length - 1
        if spec is None or spec == LAST_REAL:
            return length - 1
        return int(tile_rows(spec, self.input_ids.shape[0])[row]) % length

    def chunks(self, row: int, locations: List[Tuple], internal_batch_size: int):
        """``(locations, t0)`` pairs; ``t0`` is None for locations left to the plain path."""
        read = self.read_position(row)
        length = self.input_ids.shape[1]
        cached = sorted((loc for loc in locations if loc[0] <= read), key=lambda loc: loc[0])
        rest = [loc for loc in locations if loc[0] > read]
        out = []
        index = 0
        while index < len(cached):
            t0 = max(0, length - ALIGN * math.ceil((length - cached[index][0]) / ALIGN))
            same_start = sum(1 for loc in cached[index:] if loc[0] < t0 + ALIGN)
            width = max(1, min(internal_batch_size, max(same_start, math.ceil((length - t0) / CHUNK_DIVISOR))))
            out.append((cached[index : index + width], t0))
            index += width
        for start in range(0, len(rest), internal_batch_size):
            out.append((rest[start : start + internal_batch_size], None))
        return out

    def _cache_arg(self) -> str:
        return cache_argument(self.model)

    def _clean_cache(self, row: int):
        if row not in self._clean:
            self._clean.clear()  # one example at a time
            kwargs = {"use_cache": True, self._cache_arg(): self.cache_cls(config=self.model.config)}
            if self.mask is not None:
                kwargs["attention_mask"] = self.mask[row : row + 1]
            self.model(self.input_ids[row : row + 1], logits_to_keep=1, **kwargs)
            self._clean[row] = kwargs[self._cache_arg()]
        return self._clean[row]

    def _prefix(self, row: int, t0: int):
        """A fresh cache holding the clean keys/values of positions ``< t0``."""
        cache = self.cache_cls(config=self.model.config)
        if t0 == 0:
            return cache
        clean = self._clean_cache(row)
        for index, layer in enumerate(clean.layers):
            cache.update(layer.keys[:, :, :t0], layer.values[:, :, :t0], index)
        return cache

    def run(self, layer_index: int, row: int, chunk: List[Tuple], t0: int, corrupt: Tensor,
            sub_evaluator: MetricEvaluator, num_heads: Optional[int]) -> Tensor:
        """Metric values ``(len(chunk),)`` of the patched runs of example ``row``."""
        copies = len(chunk)
        source = corrupt[row : row + 1]

        def patch(index: int, tensor: Tensor) -> Optional[Tensor]:
            if index != layer_index:
                return None
            patched = tensor.repeat(copies if tensor.shape[0] == 1 else 1, *([1] * (tensor.dim() - 1)))
            src = source.to(patched.dtype)
            for k, location in enumerate(chunk):
                position = location[0]
                if len(location) == 1:
                    patched[k, position - t0] = src[0, position]
                else:
                    width = patched.shape[-1] // int(num_heads)  # type: ignore[arg-type]
                    cols = slice(location[1] * width, (location[1] + 1) * width)
                    patched[k, position - t0, ..., cols] = src[0, position, ..., cols]
            return patched

        kwargs: Dict[str, Any] = {"use_cache": True, self._cache_arg(): self._prefix(row, t0)}
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask[row : row + 1]
        run_inputs = (self.input_ids[row : row + 1, t0:],)
        with layer_hooks(self.layers, self.flags, patch), metric_logits(
            self.model, sub_evaluator, self.layers, offset=t0
        ):
            output = call_model(self.model, run_inputs, (), kwargs)
        return sub_evaluator(output, None)


__all__ = ["CHUNK_DIVISOR", "PrefixCacheRunner", "cache_argument"]
