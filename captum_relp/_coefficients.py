"""The one coefficient pass: every method that needs :math:`\\rho` computes it here.

:func:`layer_coefficients` applies a rule set, runs the forward, captures the *sites*
(layer inputs/outputs through hooks, or tensors the forward returns), evaluates the
metric through the one metric contract (:class:`~captum_relp.metrics.MetricEvaluator`:
shape ``(rows,)``, finite, named in the error) and takes the coefficients of the metric
at every site, all at once or streamed to ``on_coefficient`` as each arrives in the
backward pass. RelP (with and without ``reduce=``), AtP, IG's inner gradient, edge scores
(RelP, EAP, EAP-IG) and feature edges call it; nothing else in the package applies rules
or differentiates a metric (``tests/test_layout.py`` checks this). It plays the part of
Captum's ``compute_layer_gradients_and_eval`` with rules and a checked metric.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._hooks import capture, layer_hooks
from .metrics import MetricEvaluator
from .rules import RuleSet, apply_rules
from .rules.switch import switch_rules

OnCoefficient = Callable[[int, Tensor, Tensor], None]


def disconnected_message(names: Sequence[str]) -> str:
    """The error for sites the metric does not depend on.

    Example:
        >>> disconnected_message(["layer[0] (Linear)"]).split(":")[0]
        'the metric does not depend on layer[0] (Linear)'
    """
    return (
        f"the metric does not depend on {', '.join(names)}: its coefficient is disconnected from the "
        "metric. Is the layer downstream of the metric's inputs, or is the model wrapped in a graph "
        "that bypasses module hooks (e.g. torch.compile of a submodule)? Pass allow_unused=True to "
        "score such layers as zero."
    )


class Sites:
    """Where coefficients are taken: :meth:`capturing` is entered around the forward and yields
    ``read(output)``, the site tensors (one per site); errors call site ``i`` ``describe(i)``."""

    def __init__(self, describe: Callable[[int], str]) -> None:
        self.name = describe

    def capturing(self) -> ContextManager[Callable[[Any], List[Tensor]]]:
        raise NotImplementedError(f"{type(self).__name__} must define capturing()")


class ModuleSites(Sites):
    """The outputs (or, per ``flags``, first inputs) of ``layers``, captured as gradient leaves
    (``make_leaf``) or as they are.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> with ModuleSites([net[0]], [False]).capturing() as read:
        ...     out = net(torch.ones(1, 2))
        >>> read(out)[0].shape
        torch.Size([1, 2])
    """

    def __init__(self, layers: Sequence[nn.Module], flags: Sequence[bool],
                 names: Optional[Sequence[str]] = None, make_leaf: bool = True) -> None:
        names = list(names or (f"layer[{i}] ({type(m).__name__})" for i, m in enumerate(layers)))
        super().__init__(names.__getitem__)
        self.layers, self.flags, self.make_leaf = list(layers), list(flags), make_leaf

    @contextmanager
    def capturing(self) -> Iterator[Callable[[Any], List[Tensor]]]:
        store: List[Optional[Tensor]] = [None] * len(self.layers)
        with layer_hooks(self.layers, self.flags, capture(store, make_leaf=self.make_leaf)):
            yield lambda output: [self._require(t, i) for i, t in enumerate(store)]

    def _require(self, tensor: Optional[Tensor], index: int) -> Tensor:
        if tensor is None:
            raise ValueError(f"{self.name(index)} was not called in the forward pass: is it part of "
                             "the model's computation?")
        return tensor


class TensorSites(Sites):
    """Tensors the forward itself returns or records, ``read(output)``.

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> with TensorSites(lambda out: [x], "x {}".format).capturing() as read:
        ...     pass
        >>> read(None)[0] is x
        True
    """

    def __init__(self, read: Callable[[Any], Sequence[Tensor]],
                 describe: Callable[[int], str] = "tensor {}".format) -> None:
        super().__init__(describe)
        self.read = read

    @contextmanager
    def capturing(self) -> Iterator[Callable[[Any], List[Tensor]]]:
        yield lambda output: list(self.read(output))


@dataclass
class Coefficients:
    """What one pass gives.

    Attributes:
        activations: the site tensors of the pass (empty when streamed: each is dropped once
            its coefficient has been handed to ``on_coefficient``).
        coefficients: ``d metric / d site`` under the rules, one per site (``None`` for every
            site when streamed to ``on_coefficient``).
        unused: indices of sites the metric does not depend on (zero coefficients; only
            with ``allow_unused``).
        values: the checked metric values, ``(rows,)``.
        output: what the forward returned.
    """

    activations: List[Tensor]
    coefficients: List[Optional[Tensor]]
    unused: List[int]
    values: Tensor
    output: Any

    def grad(self, seed: Tensor, tensors: Sequence[Tensor]) -> List[Optional[Tensor]]:
        """Gradients of ``seed`` (a function of the site tensors) w.r.t. ``tensors`` through the
        rules-applied graph of this pass (``None`` where disconnected); needs ``keep_graph``."""
        return list(torch.autograd.grad(seed, list(tensors), retain_graph=True, allow_unused=True))


@contextmanager
def layer_coefficients(
    forward: Callable[[], Any],
    sites: Sites,
    evaluator: MetricEvaluator,
    rules: Union[str, RuleSet, None] = None,
    *,
    model: Optional[nn.Module] = None,
    strict: bool = True,
    attention_mask: Optional[Tensor] = None,
    allow_unused: bool = False,
    on_coefficient: Optional[OnCoefficient] = None,
    keep_graph: bool = False,
) -> Iterator[Coefficients]:
    """One rules-applied forward and backward pass; the rules (and, with ``keep_graph``, the
    graph) stay until the ``with`` block exits.

    Args:
        forward: runs the model and returns its output (a tensor, an output with ``.logits``
            or an object whose ``.logits`` the metric reads, e.g. ``GraphRun``).
        sites: where coefficients are taken (:class:`ModuleSites`, :class:`TensorSites`).
        evaluator: the metric, checked (shape ``(rows,)``, finite).
        rules: the rule set applied to ``model`` for the pass (``None``: no rules context).
        model: the module the rules apply to.
        strict: as in :func:`~captum_relp.rules.apply_rules`.
        attention_mask: read by ``target=`` metrics (last real position).
        allow_unused: zeros (listed in ``unused``) instead of a ``ValueError`` for sites the
            metric does not depend on.
        on_coefficient: ``on_coefficient(i, activation, coefficient)`` runs for site ``i`` in the
            backward pass, as its coefficient arrives; that site's tensors are dropped right
            after (for disconnected sites it runs after the pass with zeros).
        keep_graph: keep the graph for :meth:`Coefficients.grad` inside the ``with`` block.

    Yields:
        Coefficients

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> x = torch.randn(4, 2)
        >>> with layer_coefficients(lambda: net(x), ModuleSites([net[1]], [False]), MetricEvaluator(4),
        ...                         "relp", model=net) as result:
        ...     [c.shape for c in result.coefficients]
        [torch.Size([4, 3])]
    """
    rules_applied = nullcontext() if rules is None or model is None else apply_rules(model, rules, strict)
    with torch.enable_grad(), rules_applied, sites.capturing() as read:
        output, values, acts = _evaluated(forward, evaluator, attention_mask, read)
        if on_coefficient is None:
            grads = torch.autograd.grad(values.sum(), acts, allow_unused=True, retain_graph=keep_graph)
            unused = _unused(sites, [g is not None for g in grads], allow_unused)
            coefficients = [torch.zeros_like(t) if g is None else g for t, g in zip(acts, grads)]
        else:  # nothing but the graph keeps the output and the activations alive
            output = None
            n_sites = len(acts)
            unused = _streamed(sites, acts, values, on_coefficient, allow_unused, keep_graph)
            coefficients = [None] * n_sites
        yield Coefficients(acts, coefficients, unused, values, output)


def candidate_coefficients(
    forward: Callable[[], Any],
    sites: ModuleSites,
    evaluator: MetricEvaluator,
    candidates: Sequence[RuleSet],
    on_candidate: Callable[[int, List[Tensor], List[Tensor]], None],
    *,
    model: nn.Module,
    strict: bool = True,
    attention_mask: Optional[Tensor] = None,
    allow_unused: bool = False,
) -> Tensor:
    """The coefficients of one forward pass under every candidate rule set: the forward runs once
    with all candidates switched in (:func:`~captum_relp.rules.switch.switch_rules`), then one
    backward pass per candidate over the kept graph.

    ``on_candidate(k, activations, coefficients)`` receives candidate ``k``'s coefficients (zeros
    for sites the metric does not depend on, with ``allow_unused``); returns the metric values.
    Raises :class:`~captum_relp.rules.switch.SwitchUnsupported` (before any forward pass) when the
    candidates cannot share a forward pass.

    Example:
        >>> import torch
        >>> from captum_relp import RuleSet
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> got = {}
        >>> values = candidate_coefficients(lambda: net(torch.ones(4, 2)), ModuleSites([net[0]], [False]),
        ...     MetricEvaluator(4), [RuleSet("gradient", categories=()), RuleSet("relp")],
        ...     lambda k, acts, coefficients: got.update({k: coefficients[0]}), model=net)
        >>> sorted(got), values.shape
        ([0, 1], torch.Size([4]))
    """
    with torch.enable_grad(), switch_rules(model, candidates, strict, sites.layers) as switch, \
            sites.capturing() as read:
        _, values, acts = _evaluated(forward, evaluator, attention_mask, read)  # the output is not kept
        total = values.sum()
        for k in range(len(candidates)):
            switch.select(k)
            grads = torch.autograd.grad(total, acts, allow_unused=True, retain_graph=k + 1 < len(candidates))
            _unused(sites, [g is not None for g in grads], allow_unused)
            on_candidate(k, acts, [torch.zeros_like(t) if g is None else g for t, g in zip(acts, grads)])
        return values.detach()


def _evaluated(forward: Callable[[], Any], evaluator: MetricEvaluator, attention_mask: Optional[Tensor],
               read: Callable[[Any], List[Tensor]]):
    """Run the forward, check and evaluate the metric on its logits, read the sites."""
    output = forward()
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", output)
    evaluator.check_target(logits)
    return output, evaluator(logits, attention_mask), read(output)


def _unused(sites: Sites, arrived: Sequence[bool], allow_unused: bool) -> List[int]:
    unused = [i for i, done in enumerate(arrived) if not done]
    if unused and not allow_unused:
        raise ValueError(disconnected_message([sites.name(i) for i in unused]))
    return unused


def _streamed(sites: Sites, acts: List[Tensor], values: Tensor, on_coefficient: OnCoefficient,
              allow_unused: bool, keep_graph: bool) -> List[int]:
    """The backward pass with ``on_coefficient`` run per site as its coefficient arrives."""
    arrived = [False] * len(acts)
    empty = [(a.shape, a.new_empty(0)) for a in acts]  # shape, dtype and device, not the values
    store: List[Optional[Tensor]] = list(acts)

    def on_grad(index: int):
        def hook(grad: Tensor) -> None:
            on_coefficient(index, store[index].detach(), grad)  # type: ignore[union-attr]
            arrived[index], store[index] = True, None

        return hook

    for index, act in enumerate(acts):
        act.register_hook(on_grad(index))
    leaves = [a for a in acts if a.is_leaf] or acts
    acts.clear()
    torch.autograd.grad(values.sum(), leaves, allow_unused=True, retain_graph=keep_graph)
    del leaves
    unused = _unused(sites, arrived, allow_unused)
    for index in unused:  # the metric does not depend on these sites: zero scores
        zero = empty[index][1].new_zeros(empty[index][0])
        on_coefficient(index, zero, zero)
    return unused
