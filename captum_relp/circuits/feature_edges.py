r"""Edges between the nodes of a :class:`~captum_relp.circuits.nodes.NodeSpace` (Marks et al., 2025).

For an upstream node ``u`` and a downstream node ``d`` the edge score is

.. math:: s(u \to d) = \mathbb{E}_x\, (a_u(x_{clean}) - a_u(x_{corrupt})) \cdot
          \frac{\partial (\rho_d \, a_d)}{\partial a_u},

where :math:`\rho_d` is ``d``'s coefficient (the RelP propagation coefficient
under ``apply_rules``, or the gradient for AtP, rules ``"none"``), held fixed, and
the derivative is *direct*: every other node group between ``u`` and ``d`` is
held at its clean value. It is a vector-Jacobian product: for each downstream
node one backward pass of ``rho_d * a_d`` to the upstream groups scores the edges
from every upstream node at once.

The direct derivatives come from a forward pass in which every node group's
activation is replaced by a detached leaf of the same value, and SAE features and
error nodes are computed differentiably (``f = encode(a)``, ``e = a - decode(f)``;
the submodule's output becomes ``decode(f) + e``). With no restriction to top
nodes, the edges leaving a node (including its direct edge to the metric, target
``"metric"``) sum to its node effect exactly: the chain rule over the first node
group every path meets.

Cost: three forward passes (corrupt, clean, clean with leaves) and ``2 + D``
backward passes, ``D`` the number of kept downstream nodes.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .._coefficients import Coefficients, ModuleSites, Sites, layer_coefficients
from .._forward import call_model, check_token_ids
from .._hooks import frozen_model, hooks_removed, layer_hooks
from .._selection import top_finite
from ..metrics import MetricEvaluator
from ..rules import RuleSet, resolve_rules
from .nodes import NodeSpace

METRIC_NODE = "metric"
"""Target name of the edges from a node straight to the metric."""


@dataclass
class FeatureEdges:
    """The top nodes of a node space and the edges between them.

    Attributes:
        nodes: one dict per kept node: ``id`` (``"group/position/unit"``), ``group``,
            ``position``, ``unit`` and ``effect`` (node effect, mean over prompts).
        edges: one dict per edge: ``source``, ``target`` (a node id or ``"metric"``), ``score``.
        rules: the rule set (``"relp"``, ``"relp-ah"``; ``"none"`` is AtP).
        n_forward, n_backward: passes over the prompt batch.
        seconds: wall time.

    Example:
        >>> found = FeatureEdges([], [{"source": "a", "target": "metric", "score": -2.0},
        ...                           {"source": "b", "target": "metric", "score": 1.0}], "relp", 3, 2, 0.0)
        >>> found.top_edges(1)[0]["source"]
        'a'
    """

    nodes: List[Dict[str, object]]
    edges: List[Dict[str, object]]
    rules: str
    n_forward: int
    n_backward: int
    seconds: float
    info: Dict[str, object] = field(default_factory=dict)

    def top_edges(self, k: int = 20) -> List[Dict[str, object]]:
        """The ``k`` edges of largest ``|score|`` (all edges when there are fewer).

        Only edges with a finite score are chosen.

        Raises:
            ValueError: if ``k`` exceeds the number of edges with a finite score (the message
                says how many are unscored).
        """
        scores = torch.tensor([abs(float(e["score"])) for e in self.edges], dtype=torch.float64)
        return [self.edges[i] for i in top_finite(scores, min(k, len(self.edges)), "edges").tolist()]

    def outgoing(self, node_id: str) -> float:
        """Sum of the scores of the edges leaving ``node_id``."""
        return float(sum(float(e["score"]) for e in self.edges if e["source"] == node_id))

    def to_dict(self) -> Dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)

    def save(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def feature_edges(
    space: NodeSpace,
    clean: Tensor,
    corrupt: Tensor,
    metric: Callable[[Tensor], Tensor],
    attention_mask: Optional[Tensor] = None,
    rules: Union[str, RuleSet, None] = "relp",
    n_nodes: Optional[int] = 30,
    strict: bool = True,
) -> FeatureEdges:
    r"""Score the edges between the top nodes of ``space`` with RelP rules or gradients.

    Args:
        space (NodeSpace): components, neurons or SAE features (+ error nodes).
        clean (Tensor): ``(B, T)`` clean token ids.
        corrupt (Tensor): ``(B, T)`` corrupt token ids, aligned with ``clean``.
        metric (callable): ``metric(logits) -> Tensor[B]``.
        attention_mask (Tensor, optional): ``(B, T)``, shared by both runs.
        rules (str or RuleSet, optional): ``"relp"`` (default), ``"relp-ah"``, or
            ``"none"`` (plain gradients: the AtP edges of Marks et al.).
        n_nodes (int, optional): keep the ``n_nodes`` nodes of largest ``|effect|``
            (all groups together, effects averaged over prompts at matching positions);
            ``None`` keeps every node.
        strict (bool): as in :func:`~captum_relp.rules.apply_rules`.

    Returns:
        FeatureEdges: kept nodes with their effects and the edges among them (plus
        each node's edge to the metric).

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.circuits.nodes import NodeSpace
        >>> from captum_relp.metrics import logit_diff
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20)).eval()
        >>> space = NodeSpace(model, "components")
        >>> result = feature_edges(space, torch.ones(1, 3, dtype=torch.long),
        ...                        torch.zeros(1, 3, dtype=torch.long), logit_diff(1, 2), n_nodes=4)
        >>> len(result.nodes), result.n_forward
        (4, 3)
    """
    ruleset = resolve_rules(rules)
    rules_name = rules if isinstance(rules, str) else ("none" if rules is None else type(rules).__name__)
    extra = {} if attention_mask is None else {"attention_mask": attention_mask}
    model = space.model
    check_token_ids(model, (clean, corrupt))
    evaluator = MetricEvaluator(clean.shape[0], metric=metric)
    options = dict(model=model, strict=strict)
    start = time.perf_counter()
    with frozen_model(model):
        # rules leave forward values bit-identical: none needed here
        corrupt_acts = space.activations(lambda: call_model(model, (corrupt,), (), extra))
        layers, flags = space.layers_and_flags()
        with layer_coefficients(lambda: _run(space, clean, extra), ModuleSites(
                layers, flags, [f"node group {g.name}" for g in space.groups]), evaluator, ruleset, **options) as run:
            coefficients = [c.detach() for c in run.coefficients]
            deltas = [(c.detach() - k).float() for c, k in zip(run.activations, corrupt_acts)]
        effects = [_per_node(space, i, d * r.float()).mean(0) for i, (d, r) in enumerate(zip(deltas, coefficients))]
        kept = _top_nodes(effects, n_nodes)
        leaves = _LeafSites(space, {g for g, _, _ in kept})
        with layer_coefficients(lambda: call_model(model, (clean,), (), extra), leaves, evaluator, ruleset,
                                allow_unused=True, keep_graph=True, **options) as direct:
            edges, backwards = _edges(space, leaves, direct, kept, deltas, coefficients)
    names = [g.name for g in space.groups]
    nodes = [{"id": _node_id(names[g], t, u), "group": names[g], "position": t, "unit": u,
              "effect": float(effects[g][t, u])} for g, t, u in kept]
    return FeatureEdges(nodes, edges, rules_name, 3, 2 + backwards, time.perf_counter() - start,
                        {"kind": space.kind, "n_prompts": int(clean.shape[0]), "n_nodes": n_nodes})


def _node_id(group: str, position: int, unit: int) -> str:
    return f"{group}/{position}/{unit}"


def _run(space: NodeSpace, ids: Tensor, extra: Dict) -> Tensor:
    with space.active():
        return call_model(space.model, (ids,), (), extra)


def _per_node(space: NodeSpace, index: int, values: Tensor) -> Tensor:
    return values.sum(-1, keepdim=True) if space.groups[index].sum_hidden else values


def _top_nodes(effects: List[Tensor], n_nodes: Optional[int]) -> List[Tuple[int, int, int]]:
    """``(group, position, unit)`` of the ``n_nodes`` largest finite ``|effect|`` (``None``: all)."""
    flat = torch.cat([e.abs().flatten() for e in effects])
    count = flat.numel() if n_nodes is None else min(int(n_nodes), flat.numel())
    order = top_finite(flat, count, "nodes").tolist()
    offsets, kept = [0], []
    for e in effects:
        offsets.append(offsets[-1] + e.numel())
    for flat_index in order:
        group = next(g for g in range(len(effects)) if flat_index < offsets[g + 1])
        t, u = divmod(flat_index - offsets[group], effects[group].shape[1])
        kept.append((group, t, u))
    return kept


@dataclass
class _Graph:
    pre: Dict[int, Tensor] = field(default_factory=dict)
    leaves: Dict[int, Tensor] = field(default_factory=dict)
    order: List[int] = field(default_factory=list)

    def record(self, index: int, tensor: Tensor) -> Tensor:
        self.pre[index] = tensor
        self.leaves[index] = tensor.detach().requires_grad_(True)
        self.order.append(index)
        return self.leaves[index]


@contextmanager
def _leaf_graph(space: NodeSpace) -> Iterator[_Graph]:
    """Hooks making every group a leaf of its clean value; SAE splices computed differentiably."""
    graph = _Graph()
    index = {g.name: i for i, g in enumerate(space.groups)}
    plain = [i for i, g in enumerate(space.groups) if not any(g.name.startswith(k + ".") for k in space.splices)]

    def splice_hook(key: str, sae):
        def hook(module, args, output):
            act = output[0] if isinstance(output, tuple) else output
            dtype = next(sae.parameters(), act).dtype
            features = sae.encode(act.to(dtype))
            error = act.to(dtype) - sae.decode(features)
            f_leaf = graph.record(index[f"{key}.features"], features)
            e_leaf = graph.record(index[f"{key}.error"], error)
            new = (sae.decode(f_leaf) + e_leaf).to(act.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    with hooks_removed() as handles:
        for key, (host, splice) in space.splices.items():
            splice.to(next(host.parameters(), torch.empty(0)).device)
            handles.append(host.register_forward_hook(splice_hook(key, splice.sae)))
        with layer_hooks([space.groups[i].module for i in plain], [space.groups[i].use_input for i in plain],
                         lambda j, t: graph.record(plain[j], t)):
            yield graph


class _LeafSites(Sites):
    """The kept node groups as leaves of the clean forward (:func:`_leaf_graph`), in forward order."""

    def __init__(self, space: NodeSpace, kept_groups) -> None:
        super().__init__(lambda index: f"node group {space.groups[self.sources[index]].name}")
        self.space, self.kept_groups = space, kept_groups
        self.graph = _Graph()
        self.sources: List[int] = []

    @contextmanager
    def capturing(self) -> Iterator[Callable[[object], List[Tensor]]]:
        with _leaf_graph(self.space) as graph:
            self.graph = graph

            def read(output: object) -> List[Tensor]:
                self.sources = [g for g in graph.order if g in self.kept_groups]
                return [graph.leaves[g] for g in self.sources]

            yield read


def _edges(space, leaves: _LeafSites, direct: Coefficients, kept, deltas, coefficients) -> Tuple[List[Dict], int]:
    names = [g.name for g in space.groups]
    by_group: Dict[int, List[Tuple[int, int]]] = {}
    for g, t, u in kept:
        by_group.setdefault(g, []).append((t, u))
    edges: List[Dict[str, object]] = []
    graph = leaves.graph
    for j, (g, grad) in enumerate(zip(leaves.sources, direct.coefficients)):
        if j not in direct.unused:  # a group the metric does not depend on has no edge to it
            _append(edges, space, names, g, by_group[g], deltas[g], grad, METRIC_NODE, None)
    backwards = 1
    for position, d in enumerate(graph.order):
        upstream = [g for g in graph.order[:position] if g in by_group]
        if d not in by_group or not upstream or not graph.pre[d].requires_grad:
            continue
        weighted = coefficients[d].to(graph.pre[d].dtype) * graph.pre[d]
        for t, u in by_group[d]:
            seed = weighted[:, t].sum() if space.groups[d].sum_hidden else weighted[:, t, u].sum()
            grads = direct.grad(seed, [graph.leaves[g] for g in upstream])
            backwards += 1
            for g, grad in zip(upstream, grads):
                _append(edges, space, names, g, by_group[g], deltas[g], grad, _node_id(names[d], t, u), t)
    return edges, backwards


def _append(edges, space, names, group: int, nodes, delta: Tensor, grad: Optional[Tensor], target: str,
            position: Optional[int]) -> None:
    if grad is None:
        return
    scores = _per_node(space, group, delta * grad.float()).mean(0)
    for t, u in nodes:
        if position is None or t <= position:
            edges.append({"source": _node_id(names[group], t, u), "target": target, "score": float(scores[t, u])})


__all__ = ["METRIC_NODE", "FeatureEdges", "feature_edges"]
