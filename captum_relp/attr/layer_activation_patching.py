"""Exact activation patching (AP), the ground truth RelP and AtP approximate."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import LayerActivation
from captum.log import log_usage
from torch import Tensor
from tqdm.auto import tqdm

from .._forward import call_model, metric_logits
from .._hooks import captum_safe_outputs, capture, frozen_model, layer_hooks
from ..families import reuse_prefix_allowed
from ..metrics import MetricEvaluator, MetricType, TargetType, checked_metric, tile_rows
from ._base import PatchingAttribution, TensorOrTuple
from ._batched_patching import BatchedPatchRunner
from ._prefix_cache import PrefixCacheRunner

GRANULARITIES = ("position", "layer", "head")
STRATEGIES = ("auto", "batched", "per-example", "plain")


def choose_strategy(strategy: str = "auto", reuse_prefix: Optional[bool] = None) -> str:
    """The batching strategy of one :class:`LayerActivationPatching` call.

    ``reuse_prefix`` (the option of earlier versions) picks ``"per-example"`` (True) or
    ``"plain"`` (False). ``"auto"`` is ``"batched"``: it does a subset of the plain path's
    work (suffixes only, logits only at the read positions) in fewer, larger forward
    passes, and measured fastest on every shape of ``benchmarks/bench_ap_strategies.py``
    (short IOI prompts on 4- and 30-layer models, 1 to 25 prompts, T up to 128).

    Example:
        >>> choose_strategy(), choose_strategy(reuse_prefix=False)
        ('batched', 'plain')
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto" and reuse_prefix is not None:
        return "per-example" if reuse_prefix else "plain"
    return "batched" if strategy == "auto" else strategy


class _ExampleMetric:
    """The metric of example ``b`` of a batch of ``B``, evaluated on rows of a batch-1 run."""

    def __init__(self, metric: Callable[[Tensor], Tensor], index: int, batch_size: int) -> None:
        self.metric, self.index, self.batch_size = metric, index, batch_size
        self.reads_final_logits = bool(getattr(metric, "reads_final_logits", False))
        positions = getattr(metric, "positions", None) if self.reads_final_logits else None
        self.positions = None if positions is None else int(tile_rows(positions, batch_size)[index])

    def __call__(self, output: Tensor) -> Tensor:
        return torch.stack([
            checked_metric(self.metric, output[r : r + 1].expand(self.batch_size, *output.shape[1:]),
                           self.batch_size)[self.index]
            for r in range(output.shape[0])
        ])


class LayerActivationPatching(PatchingAttribution):
    r"""Activation patching: ``L(clean) - L(clean | do(layer[loc] <- corrupt[loc]))``.

    Corrupt activations are collected in one corrupt forward pass; then each location (a position, a whole layer, or a (position, head) pair) is
    patched in its own run. Runs are batched (``internal_batch_size`` patched copies
    per forward) and, with ``reuse_prefix=True``, each example is processed alone so
    the network below the patched layer runs once per example: the patched copies are
    created at the layer itself (the other tensors of the forward, such as masks and
    position embeddings, have batch 1 and broadcast).

    The sign matches :class:`LayerRelevancePatching`: a positive effect means patching
    in the corrupt activation lowers the metric.

    Args:
        forward_func (Callable or nn.Module): the model (Hugging Face models: ``.logits``).
        layer (nn.Module or list of nn.Module): layer(s) to patch.
        model (nn.Module, optional): the root module, if ``forward_func`` is a function.

    Examples::

        >>> import torch
        >>> from captum_relp import LayerActivationPatching
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> ap = LayerActivationPatching(net, net[0])
        >>> ap.attribute(torch.ones(1, 2), baselines=torch.zeros(1, 2), granularity="layer").shape
        torch.Size([1])
    """

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTuple,
        baselines: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: Union[bool, Sequence[bool]] = False,
        metric: MetricType = None,
        granularity: str = "position",
        num_heads: Optional[int] = None,
        internal_batch_size: int = 32,
        reuse_prefix: Optional[bool] = None,
        show_progress: bool = False,
        use_cache: bool = True,
        strategy: str = "auto",
        logit_positions: Optional[Union[int, Sequence[int]]] = None,
    ) -> Union[Tensor, List[Tensor]]:
        r"""Exact patching effects.

        Args:
            inputs, baselines: clean and corrupt inputs of equal shape.
            target, metric, additional_forward_args, attribute_to_layer_input: as in
                ``LayerRelevancePatching.attribute``.
            granularity (str): ``"position"`` (one run per position, result ``(B, T)``),
                ``"layer"`` (all positions at once, ``(B,)``) or ``"head"`` (one run per
                position and head, ``(B, T, H)``; needs ``num_heads`` and a layer whose
                activation concatenates heads, e.g. an attention output projection's input).
            internal_batch_size (int): patched copies per forward pass (with
                ``strategy="batched"`` or ``"plain"`` each copy holds all ``B`` examples).
            reuse_prefix (bool, optional): ``True`` selects ``strategy="per-example"``,
                ``False`` ``strategy="plain"`` (the options of earlier versions).
            show_progress (bool): show a progress bar (one tick per patched location).
            use_cache (bool): on Hugging Face causal LMs with ``granularity="position"`` or
                ``"head"`` and a metric whose read positions are known, reuse the clean
                key/value cache for the positions before the patched ones and recompute
                only the suffix; the effects are those of the plain path.
                Bidirectional and unknown models always run the full sequence.
            strategy (str): how patched runs are batched (all give the same effects):

                * ``"batched"``: all examples and several components per forward pass,
                  suffixes on the clean cache (``captum_relp.attr._batched_patching``);
                * ``"per-example"``: one example per forward, the patched copies created at
                  the layer so the layers below it run once, with the cache
                  (``captum_relp.attr._prefix_cache``) unless ``use_cache=False``;
                * ``"plain"``: one component per forward, all examples, full sequence;
                * ``"auto"`` (default): ``choose_strategy``.
            logit_positions (int or list of int, optional): the positions a plain callable
                ``metric`` reads, as in ``LayerRelevancePatching.attribute``.

        Returns:
            Tensor or list of Tensor: effects per layer, zero at padded positions.

        Examples::

            >>> import torch
            >>> from captum_relp import LayerActivationPatching
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
            >>> x, x_corrupt = torch.ones(2, 4, 3), torch.zeros(2, 4, 3)
            >>> effects = LayerActivationPatching(net, net[0]).attribute(
            ...     x, baselines=x_corrupt, metric=lambda out: out[:, -1, 0])
            >>> effects.shape
            torch.Size([2, 4])
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "head" and not num_heads:
            raise ValueError("granularity='head' needs num_heads")
        if internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
        strategy = choose_strategy(strategy, reuse_prefix)
        call = self._prepare(inputs, baselines, target, additional_forward_args,
                             attribute_to_layer_input, metric, True, needs_grad=False,
                             logit_positions=logit_positions)
        inputs, baselines, flags, args, kwargs = call.inputs, call.baselines, call.flags, call.args, call.kwargs
        mask, evaluator = call.attention_mask, call.evaluator
        batch_size = inputs[0].shape[0]
        allowed = reuse_prefix_allowed(self.forward_func)  # family table: copies at the layer give the same numbers
        if strategy == "per-example" and not allowed:
            strategy = "plain"

        with frozen_model(self.model), torch.no_grad():
            with metric_logits(self.forward_func, evaluator, self.layers):
                seen: List[Optional[Tensor]] = [None] * len(self.layers)
                with layer_hooks(self.layers, flags, capture(seen)):  # each layer runs exactly once
                    output = call_model(self.forward_func, inputs, args, kwargs)
                widths = [self._require(t, i).shape[-1] for i, t in enumerate(seen)]
                if granularity == "head" and any(w % int(num_heads) for w in widths):
                    raise ValueError(f"num_heads={num_heads} does not divide the layer widths {widths}")
                evaluator.check_target(output)
                clean_values = evaluator(output, mask)
                corrupt_acts = self._corrupt_activations(baselines, flags, args, kwargs)
            results = [
                torch.zeros(self._result_shape(acts, granularity, num_heads), device=clean_values.device,
                            dtype=clean_values.dtype)  # the model's dtype: float64 stays float64
                for acts in corrupt_acts
            ]
            if strategy == "batched":
                runner = BatchedPatchRunner(self.forward_func, self.layers, flags, inputs, args, kwargs,
                                            evaluator, use_cache and allowed, granularity, corrupt_acts[0].dtype,
                                            expand=allowed)
                copies = [(index, location) for index, rows, locations in
                          self._jobs(corrupt_acts, granularity, num_heads, mask, False, batch_size)
                          for location in locations if _any_real(mask, location)]
                progress = tqdm(total=len(copies), desc="activation patching", disable=not show_progress)
                for t0, chunk in runner.plan(copies, internal_batch_size, max(widths)):
                    effect = clean_values.repeat(len(chunk)) - runner.run(t0, chunk, corrupt_acts, num_heads)
                    for k, (index, location) in enumerate(chunk):
                        results[index][(slice(None),) + location] = effect[k * batch_size : (k + 1) * batch_size]
                    progress.update(len(chunk))
                progress.close()
                return self._per_layer(results, call)
            reuse_prefix = strategy == "per-example"
            jobs = self._jobs(corrupt_acts, granularity, num_heads, mask, reuse_prefix, batch_size)
            total = sum(len(locs) for _, _, locs in jobs)
            progress = tqdm(total=total, desc="activation patching", disable=not show_progress)
            cached = None
            if use_cache and PrefixCacheRunner.applies(self.forward_func, self.layers, inputs, args, kwargs,
                                                       evaluator, granularity, reuse_prefix):
                cached = PrefixCacheRunner(self.forward_func, self.layers, flags, inputs[0], mask, evaluator)
            for layer_index, rows, locations in jobs:
                if cached is not None:
                    chunks = cached.chunks(rows[0], locations, internal_batch_size)
                else:
                    chunks = [(locations[start : start + internal_batch_size], None)
                              for start in range(0, len(locations), internal_batch_size)]
                for chunk, t0 in chunks:
                    if t0 is not None:
                        patched = cached.run(  # type: ignore[union-attr]
                            layer_index, rows[0], chunk, t0, corrupt_acts[layer_index],
                            _example_evaluator(evaluator, rows[0], batch_size), num_heads)
                    else:
                        patched = self._run_chunk(
                            layer_index, flags, rows, chunk, corrupt_acts[layer_index], inputs, args,
                            kwargs, evaluator, reuse_prefix, batch_size, num_heads,
                        )
                    effect = clean_values[rows].repeat(len(chunk)) - patched
                    for k, location in enumerate(chunk):
                        block = effect[k * len(rows) : (k + 1) * len(rows)]
                        results[layer_index][(rows,) + location] = block.to(results[layer_index].dtype)
                    progress.update(len(chunk))
            progress.close()
        return self._per_layer(results, call)

    def _corrupt_activations(self, baselines, flags, args, kwargs) -> List[Tensor]:
        """Corrupt activations via Captum's LayerActivation (first entry of tuple outputs).

        Captum's forward hook stores a clone of each output, so a block that changes the
        output in place afterwards (Falcon adds the attention output to the MLP output) does
        not alter what is patched in.
        """

        def forward(*inputs: Tensor) -> Tensor:
            return call_model(self.forward_func, inputs, args, kwargs)

        acts: List[Optional[Tensor]] = [None] * len(self.layers)
        for flag in (False, True):
            indices = [i for i, f in enumerate(flags) if f == flag]
            if not indices:
                continue
            group = [self.layers[i] for i in indices]
            with captum_safe_outputs(group):
                layer_acts = LayerActivation(forward, group).attribute(baselines, attribute_to_layer_input=flag)
            for i, act in zip(indices, layer_acts):
                acts[i] = self._require(act[0] if isinstance(act, tuple) else act, i)
        return acts  # type: ignore[return-value]

    @staticmethod
    def _result_shape(acts: Tensor, granularity: str, num_heads: Optional[int]) -> Tuple[int, ...]:
        if granularity == "layer":
            return (acts.shape[0],)
        if granularity == "head":
            return (acts.shape[0], acts.shape[1], int(num_heads))
        return (acts.shape[0], acts.shape[1])

    @staticmethod
    def _jobs(corrupt_acts, granularity, num_heads, mask, reuse_prefix, batch_size):
        """(layer index, example rows, locations) triples; a location indexes the result."""
        examples = [[b] for b in range(batch_size)] if reuse_prefix else [list(range(batch_size))]
        jobs = []
        for layer_index, acts in enumerate(corrupt_acts):
            for rows in examples:
                if granularity == "layer":
                    locations = [()]
                else:
                    positions = range(acts.shape[1])
                    if mask is not None and len(rows) == 1:
                        positions = [t for t in positions if mask[rows[0], t] != 0]
                    if granularity == "head":
                        locations = [(t, h) for t in positions for h in range(int(num_heads))]
                    else:
                        locations = [(t,) for t in positions]
                jobs.append((layer_index, rows, locations))
        return jobs

    def _run_chunk(self, layer_index, flags, rows, chunk, corrupt, inputs, args, kwargs,
                   evaluator, reuse_prefix, batch_size, num_heads) -> Tensor:
        n_rows, copies = len(rows), len(chunk)
        row_index = torch.as_tensor(rows, device=corrupt.device)

        def patch(index: int, tensor: Tensor) -> Optional[Tensor]:
            if index != layer_index:
                return None
            patched = tensor.repeat(copies if tensor.shape[0] == n_rows else 1, *([1] * (tensor.dim() - 1)))
            source = corrupt[row_index].to(patched.dtype)
            for k, location in enumerate(chunk):
                block = slice(k * n_rows, (k + 1) * n_rows)
                _write(patched, block, source, location, num_heads)
            return patched

        if reuse_prefix:
            run_inputs = tuple(x[rows[0] : rows[0] + 1] for x in inputs)
            run_args, run_kwargs = _slice_batch(args, kwargs, rows[0], batch_size)
            sub_evaluator = _example_evaluator(evaluator, rows[0], batch_size)
        else:
            run_inputs = tuple(x.repeat(copies, *([1] * (x.dim() - 1))) for x in inputs)
            run_args, run_kwargs = _tile_batch(args, kwargs, copies, batch_size)
            sub_evaluator = evaluator
        with layer_hooks(self.layers, flags, patch), metric_logits(self.forward_func, sub_evaluator, self.layers):
            output = call_model(self.forward_func, run_inputs, run_args, run_kwargs)
        return sub_evaluator(output, run_kwargs.get("attention_mask"))


def _any_real(mask: Optional[Tensor], location: Tuple) -> bool:
    """Whether some example has a real token at the location's position."""
    return mask is None or not location or bool(mask[:, location[0]].any())


def _write(patched: Tensor, block: slice, source: Tensor, location: Tuple, num_heads) -> None:
    if location == ():
        patched[block] = source
    elif len(location) == 1:
        patched[block, location[0]] = source[:, location[0]]
    else:
        position, head = location
        width = patched.shape[-1] // int(num_heads)
        cols = slice(head * width, (head + 1) * width)
        patched[block, position, ..., cols] = source[:, position, ..., cols]


def _is_batched(value: Any, batch_size: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size


def _slice_batch(args: Tuple, kwargs: Dict, row: int, batch_size: int):
    def cut(v):
        return v[row : row + 1] if _is_batched(v, batch_size) else v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _tile_batch(args: Tuple, kwargs: Dict, copies: int, batch_size: int):
    def tile(v):
        return v.repeat(copies, *([1] * (v.dim() - 1))) if _is_batched(v, batch_size) else v

    return tuple(tile(a) for a in args), {k: tile(v) for k, v in kwargs.items()}


def _example_evaluator(evaluator: MetricEvaluator, row: int, batch_size: int) -> MetricEvaluator:
    if evaluator.metric is not None:
        return MetricEvaluator(1, metric=_ExampleMetric(evaluator.metric, row, batch_size),
                               logit_positions=evaluator.logit_positions)
    target = evaluator.target
    if target is not None:
        values = torch.as_tensor(target).reshape(-1)
        target = int(values[0] if values.numel() == 1 else values[row])
    return MetricEvaluator(1, target=target)
