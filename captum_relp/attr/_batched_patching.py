"""Activation patching with all examples and several components in one forward pass.

:class:`BatchedPatchRunner` is the default strategy of
:class:`~captum_relp.LayerActivationPatching`. A *copy* is one patched location of one
component (a position, a whole layer, or a (position, head) pair) applied to all ``B``
examples of the batch; a forward pass carries up to ``internal_batch_size`` copies,
drawn from several components ("components batched into the batch dimension"), as
``copies * B`` rows ordered copy by copy (``[ex0..exB-1, ex0..]``, the order
:class:`~captum_relp._forward.MetricEvaluator` reads).

On a Hugging Face causal LM whose metric reads known positions (``target=`` or a
metric declaring ``positions``, see ``captum_relp._forward``), a copy patching position
``t`` cannot change positions ``< t``: the copies whose positions are ``>= t0`` run
only the suffix ``x[t0:]`` on the clean key/value cache of positions ``< t0``, and the
model's unembedding sees only the read positions. ``t0`` is at most the earliest
read position and ``T - MIN_SUFFIX`` (BLAS treats matrices of fewer than 4 rows
differently), and in float64 a multiple of :data:`ALIGN` (MKL's float64 kernels work
on blocks of 4 rows, so every row then falls at the same place in a block as in the
plain full-length run). In float64 the effects are bitwise those of the plain path
whenever that path's own row blocks do not straddle examples (``T`` a multiple of
4; tested on five families); in float32 they agree to rounding (oneDNN may block
rows differently).

The layers below a chunk's patches see only clean activations, so they run on the
``B`` clean rows once: the copies are created at the input of the lowest transformer
block that holds a patched layer (found with :func:`~captum_relp.models.find_blocks`;
every block from there on gets its batch-``B`` keyword tensors, such as the mask and
the rotary tables, tiled to the copies, and the cache its clean rows tiled). A model
whose blocks get another batched tensor (one whose first dimension is neither 1 nor
``B``) is detected on the first chunk, and the copies then start at the input. Without
blocks, a single example's copies are created at the patched layer itself.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._forward import LAST_REAL, call_model, metric_logits, metric_positions
from .._hooks import layer_hooks
from ..metrics import MetricEvaluator, tile_rows
from ..models import find_blocks
from ._prefix_cache import PrefixCacheRunner, cache_argument

ALIGN = 4
"""In float64, suffixes start at multiples of this position (MKL's float64 row block)."""
MIN_SUFFIX = 4
"""Suffixes have at least this many positions (shorter ones take other BLAS kernels)."""

ELEMENT_BUDGET = 1 << 20
"""At most about this many activation elements (rows x suffix x width) per forward pass: larger
batches measured slower on CPUs (``benchmarks/bench_ap_strategies.py``), smaller ones pay the
per-call overhead of the model more often."""

OVERHEAD_ROWS = 128
"""The fixed cost of running one block in a forward pass, in token rows of that block."""

Copy = Tuple[int, Tuple]
"""``(layer index, location)``: one patched component location, applied to every example."""


class BatchedPatchRunner:
    """Runs chunks of patched copies over the whole batch.

    Args:
        model: the model (``forward_func``).
        layers, flags: the patched layers and their input/output flags.
        inputs, args, kwargs: the clean call, batch ``B``.
        evaluator (MetricEvaluator): the batch's metric.
        use_cache (bool): allow suffix runs on the clean key/value cache (where exact).
        granularity (str): ``"position"``, ``"head"`` or ``"layer"``.
        dtype (torch.dtype): the activations' dtype (float64 aligns suffix starts to :data:`ALIGN`).
        expand (bool): create the copies inside the model (at a block, or at the layer for one
            example); False: tile the inputs (families whose copies must start at the input).
    """

    def __init__(self, model: Any, layers: Sequence[nn.Module], flags: Sequence[bool], inputs: Tuple[Tensor, ...],
                 args: Tuple, kwargs: Dict, evaluator: MetricEvaluator, use_cache: bool, granularity: str,
                 dtype: torch.dtype = torch.float32, expand: bool = True) -> None:
        self.model, self.layers, self.flags = model, list(layers), list(flags)
        self.inputs, self.args, self.kwargs, self.evaluator = inputs, args, kwargs, evaluator
        self.batch_size, self.dtype, self.expand = inputs[0].shape[0], dtype, expand
        self.mask: Optional[Tensor] = kwargs.get("attention_mask")
        self.cached = use_cache and granularity != "layer" and PrefixCacheRunner.applies(
            model, layers, inputs, args, kwargs, evaluator, granularity, True)
        self._clean: Any = None
        self._outputs: Dict[int, Any] = {}  # clean outputs of the blocks under patched ones (cached path)
        self.block_of = _block_of(model, self.layers) if expand else None  # None: no block-level expansion

    # planning ---------------------------------------------------------------------------------
    def read_limit(self) -> int:
        """The earliest position any example's metric reads (suffixes start at or before it)."""
        if not self.cached:  # full sequences: no suffix starts
            return 0
        spec, (rows, length) = metric_positions(self.evaluator), self.inputs[0].shape
        if spec == LAST_REAL and self.mask is not None:
            real = self.mask.long().sum(1)
            return max(0, int(real.min()) - 1)
        if spec is None or spec == LAST_REAL:
            return length - 1
        return int((tile_rows(spec, rows) % length).min())

    def start(self, position: int, limit: int) -> int:
        """The suffix start of a copy patching ``position``."""
        if not self.cached:
            return 0
        align = ALIGN if self.dtype == torch.float64 else 1
        return align * (max(0, min(position, limit, self.inputs[0].shape[1] - MIN_SUFFIX)) // align)

    def plan(self, copies: List[Copy], internal_batch_size: int, width: int = 1) -> List[Tuple[int, List[Copy]]]:
        """``(t0, copies)`` chunks covering ``copies``, of least estimated cost.

        Copies are grouped by block (the blocks below run on ``B`` rows once per chunk).
        Within a group, sorted by suffix start, consecutive copies form a chunk that
        starts at its first copy's ``t0``; the split minimizes :func:`chunk_cost` summed
        over chunks (dynamic programming). A chunk has at most ``internal_batch_size``
        copies, and at most as many as keep ``copies * B * (T - t0) * width`` within
        :data:`ELEMENT_BUDGET` (at least one).
        """
        limit, shape = self.read_limit(), self.inputs[0].shape
        length = shape[1] if len(shape) > 1 else 1
        n_blocks = len(find_blocks(self.model)) if self.block_of is not None else 1
        groups: Dict[Any, List[Tuple[int, Copy]]] = {}
        for copy in copies:
            if self.block_of is not None:
                key = self.block_of[copy[0]]
            else:
                key = copy[0] if self.batch_size == 1 and self.expand else 0  # one example: copies at the layer
            groups.setdefault(key, []).append((self.start(copy[1][0] if copy[1] else 0, limit), copy))
        chunks = []
        for key, items in sorted(groups.items()):
            items.sort(key=lambda item: item[0])
            below = key if self.block_of is not None and not self.cached else 0  # cached: skipped
            best = [0.0] + [math.inf] * len(items)
            cut = [0] * (len(items) + 1)
            for end in range(1, len(items) + 1):
                for begin in range(end - 1, -1, -1):
                    suffix, count = length - items[begin][0], end - begin
                    cap = max(1, min(internal_batch_size, ELEMENT_BUDGET // (self.batch_size * suffix * width)))
                    if count > cap:
                        break
                    cost = best[begin] + chunk_cost(self.batch_size * suffix, count, below, n_blocks)
                    if cost < best[end]:
                        best[end], cut[end] = cost, begin
            end, found = len(items), []
            while end:
                begin = cut[end]
                found.append((items[begin][0], [copy for _, copy in items[begin:end]]))
                end = begin
            chunks += found[::-1]
        return chunks

    # running ----------------------------------------------------------------------------------
    def _clean_cache(self):
        if self._clean is None:
            self._arg = cache_argument(self.model)
            cache = _TilingCache(config=self.model.config)
            extra = {} if self.mask is None else {"attention_mask": self.mask}
            blocks = find_blocks(self.model) if self.block_of is not None else []
            below = sorted({b - 1 for b in self.block_of or [] if b > 0})  # the blocks under a patched one
            handles = [blocks[i].register_forward_hook(_record(self._outputs, i)) for i in below]
            try:
                self.model(self.inputs[0], logits_to_keep=1, use_cache=True, **{self._arg: cache}, **extra)
            finally:
                for handle in handles:
                    handle.remove()
            self._clean = cache
        return self._clean

    def _prefix(self, t0: int, repeats: int):
        clean = self._clean_cache()
        cache = _TilingCache(config=self.model.config)
        for index, layer in enumerate(clean.layers):
            keys, values = layer.keys[:, :, :t0], layer.values[:, :, :t0]
            cache.update(_tile(keys, repeats), _tile(values, repeats), index)
        return cache

    def run(self, t0: int, chunk: List[Copy], corrupt: Sequence[Tensor], num_heads: Optional[int]) -> Tensor:
        """Metric values ``(len(chunk) * B,)``, copy by copy, of the patched runs."""
        if self.block_of is not None:
            try:
                return self._run(t0, chunk, corrupt, num_heads, min(self.block_of[c[0]] for c in chunk))
            except _CannotExpand:
                self.block_of = None  # the blocks get a batched tensor that cannot be tiled
        return self._run(t0, chunk, corrupt, num_heads, None)

    def _run(self, t0: int, chunk: List[Copy], corrupt: Sequence[Tensor], num_heads: Optional[int],
             expand_block: Optional[int]) -> Tensor:
        n, copies = self.batch_size, len(chunk)
        expand_at_layer = expand_block is None and n == 1 and self.expand
        by_layer: Dict[int, List[Tuple[int, Tuple]]] = {}
        for k, (layer_index, location) in enumerate(chunk):
            by_layer.setdefault(layer_index, []).append((k, location))

        def patch(index: int, tensor: Tensor) -> Optional[Tensor]:
            if index not in by_layer:
                return None
            if tensor.shape[0] == copies * n:
                patched = tensor.clone()
            elif expand_at_layer and tensor.shape[0] == 1:
                patched = tensor.repeat(copies, *([1] * (tensor.dim() - 1)))
            else:
                raise RuntimeError(f"layer[{index}] saw {tensor.shape[0]} rows, expected {copies * n}")
            source = corrupt[index].to(patched.dtype)
            for k, location in by_layer[index]:
                _write(patched, slice(k * n, (k + 1) * n), source, location, t0, num_heads)
            return patched

        repeats = 1 if expand_at_layer or expand_block is not None else copies
        if self.cached:
            self._clean_cache()  # also records the clean outputs of the blocks that are skipped
            kwargs: Dict[str, Any] = {}
            if t0:
                cache = self._prefix(t0, repeats)
                kwargs.update({"use_cache": True, self._arg: cache})
            if self.mask is not None:
                kwargs["attention_mask"] = _tile(self.mask, repeats)
            run_inputs, run_args = (_tile(self.inputs[0][:, t0:], repeats),), ()
        else:
            run_inputs = tuple(_tile(x, repeats) for x in self.inputs)
            run_args = tuple(_tile_if_batched(a, repeats, n) for a in self.args)
            kwargs = {k: _tile_if_batched(v, repeats, n) for k, v in self.kwargs.items()}
        blocks = find_blocks(self.model) if expand_block is not None else []
        handles = [] if expand_block is None else _expand_blocks(blocks, expand_block, n, copies)
        skipped = _skip_blocks(blocks[:expand_block], self._outputs.get((expand_block or 0) - 1), t0) \
            if self.cached and expand_block else []
        try:
            with layer_hooks(self.layers, self.flags, patch), metric_logits(
                    self.model, self.evaluator, self.layers, offset=t0):
                output = call_model(self.model, run_inputs, run_args, kwargs)
        finally:
            for handle in handles:
                handle.remove()
            _restore_forwards(skipped)
        mask = kwargs.get("attention_mask")
        return self.evaluator(output, None if self.cached or mask is None else _tile(mask, copies // repeats))


def chunk_cost(token_rows: int, copies: int, below: int, n_blocks: int) -> float:
    """Estimated cost of a chunk, in token rows through one block.

    ``token_rows`` (``B`` times the suffix length) run once through the ``below`` blocks
    under the patched one and ``copies`` times through the others, plus
    :data:`OVERHEAD_ROWS` per block for the call itself.

    Example:
        >>> chunk_cost(10, 4, 2, 4)  # 2 blocks x 10 rows + 2 blocks x 40 rows + 4 x OVERHEAD_ROWS (128)
        612
    """
    return OVERHEAD_ROWS * n_blocks + token_rows * (below + copies * (n_blocks - below))


class _CannotExpand(Exception):
    """A block received a batched tensor that cannot be tiled to the copies."""


def _block_of(model: Any, layers: Sequence[nn.Module]) -> Optional[List[int]]:
    """The index of the block holding each layer (a block's input counts as the block), or None."""
    try:
        blocks = find_blocks(model)
    except (ValueError, AttributeError):
        return None
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    found = [owner.get(id(layer)) for layer in layers]
    return None if any(i is None for i in found) else found  # type: ignore[return-value]


def _expand_blocks(blocks: Sequence[nn.Module], first: int, batch_size: int, copies: int) -> list:
    """Pre-hooks that tile the hidden state (at block ``first``) and the batch-``B`` tensors of later blocks."""
    rows = batch_size * copies

    def tile(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(tile(v) for v in value)
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] in (1, rows):
            return value
        if value.shape[0] != batch_size:
            raise _CannotExpand(f"a block received a tensor of shape {tuple(value.shape)}")
        return _tile(value, copies)

    def hook(module, args, kwargs):
        if args:
            return (_tile(args[0], copies) if args[0].shape[0] == batch_size else args[0],
                    *tile(args[1:])), {k: tile(v) for k, v in kwargs.items()}
        hidden = kwargs["hidden_states"]
        kwargs = {k: tile(v) for k, v in kwargs.items() if k != "hidden_states"}
        kwargs["hidden_states"] = _tile(hidden, copies) if hidden.shape[0] == batch_size else hidden
        return args, kwargs

    if copies == 1:
        return []
    return [block.register_forward_pre_hook(hook, with_kwargs=True) for block in list(blocks)[first:]]


def _record(store: Dict[int, Any], index: int):
    """A forward hook keeping block ``index``'s output in ``store`` (a tensor, or a tuple of it and Nones)."""
    def hook(module, args, output):
        parts = output if isinstance(output, (tuple, list)) else (output,)
        if isinstance(parts[0], Tensor) and all(p is None for p in parts[1:]):
            store[index] = output
    return hook


def _skip_blocks(blocks: Sequence[nn.Module], clean: Any, t0: int) -> List[Tuple[nn.Module, Any]]:
    """Blocks under the patched ones see clean activations only: instead of recomputing them, each
    returns the clean output of the last of them at positions ``>= t0`` (the suffix the run
    feeds; recorded in the full clean run, whose rows fall in the same BLAS row blocks). Their
    hooks still run. Returns what :func:`_restore_forwards` needs; nothing without ``clean``."""
    if clean is None:
        return []
    if isinstance(clean, Tensor):
        output: Any = clean[:, t0:]
    else:
        output = type(clean)([clean[0][:, t0:], *clean[1:]])
    skipped = []
    for block in blocks:
        skipped.append((block, block.__dict__.get("forward", _NO_FORWARD)))
        block.forward = lambda *args, **kwargs: output  # an instance attribute, removed afterwards
    return skipped


_NO_FORWARD = object()


def _restore_forwards(skipped: List[Tuple[nn.Module, Any]]) -> None:
    for block, forward in skipped:
        if forward is _NO_FORWARD:
            del block.forward
        else:
            block.forward = forward


def _tiling_cache_class():
    from transformers import DynamicCache

    class TilingCache(DynamicCache):
        """A DynamicCache whose clean batch-``B`` entries are tiled when ``k * B`` rows reach them."""

        def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
            if layer_idx < len(self.layers):
                layer = self.layers[layer_idx]
                keys = getattr(layer, "keys", None)
                rows = key_states.shape[0]
                if isinstance(keys, Tensor) and keys.dim() == 4 and rows > keys.shape[0] > 0 \
                        and rows % keys.shape[0] == 0:
                    layer.keys = _tile(keys, rows // keys.shape[0])
                    layer.values = _tile(layer.values, rows // keys.shape[0])
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return TilingCache


def _TilingCache(config: Any):
    return _tiling_cache_class()(config=config)


def _tile(tensor: Tensor, repeats: int) -> Tensor:
    return tensor if repeats == 1 else tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))


def _tile_if_batched(value: Any, repeats: int, batch_size: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return _tile(value, repeats)
    return value


def _write(patched: Tensor, block: slice, source: Tensor, location: Tuple, t0: int, num_heads: Optional[int]) -> None:
    """Copy ``source`` (the corrupt activation, batch ``B``) into ``patched[block]`` at ``location``."""
    if location == ():
        patched[block] = source
    elif len(location) == 1:
        patched[block, location[0] - t0] = source[:, location[0]]
    else:
        position, head = location
        width = patched.shape[-1] // int(num_heads)  # type: ignore[arg-type]
        cols = slice(head * width, (head + 1) * width)
        patched[block, position - t0, ..., cols] = source[:, position, ..., cols]


__all__ = ["ALIGN", "MIN_SUFFIX", "ELEMENT_BUDGET", "OVERHEAD_ROWS", "BatchedPatchRunner", "chunk_cost"]
