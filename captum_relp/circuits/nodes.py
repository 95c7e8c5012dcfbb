"""Node spaces for circuit discovery: components, MLP neurons, SAE features (+ error nodes).

Every node group is a *hook point* — a module and whether its input or output
holds the group's activation — so the same attribution classes (RelP, AtP, IG)
score every kind of node, and the same hooks ablate them.

SAE features are made into hook points by :class:`SAESplice`, a small module
spliced (temporarily) into the forward pass after a submodule: it encodes the
activation ``a`` into features ``f`` and an error ``e = a - decode(f)``, passes
each through an identity node module, and returns
``a + (decode(f) + e - (decode(f0) + e0))`` — exactly ``a`` when nothing is
patched (so the model's output is unchanged), ``decode(f) + e`` up to rounding
when ``f`` or ``e`` are patched or ablated. Gradients reach ``f`` through the
decoder and ``e`` directly, and pass straight through to ``a`` upstream
(Marks et al., 2025).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._hooks import capture, hooks_removed, layer_hooks
from ..models import find_blocks, model_components

NODE_KINDS = ("components", "neurons", "features")


class SAESplice(nn.Module):
    """Features and error node of one dictionary, spliced after a submodule.

    Example:
        >>> import torch
        >>> class Dict_(torch.nn.Module):
        ...     def encode(self, x): return torch.relu(x)
        ...     def decode(self, f): return 0.5 * f
        >>> splice = SAESplice(Dict_())
        >>> x = torch.randn(2, 3)
        >>> torch.equal(splice(x), x)
        True
    """

    def __init__(self, sae: nn.Module) -> None:
        super().__init__()
        self.sae = sae
        self.feature_node = nn.Identity()
        self.error_node = nn.Identity()

    def forward(self, act: Tensor) -> Tensor:
        dtype = next(self.sae.parameters(), act).dtype
        base = act.detach().to(dtype)
        with torch.no_grad():
            features0 = self.sae.encode(base)
            error0 = base - self.sae.decode(features0)
            recon0 = self.sae.decode(features0) + error0
        features = self.feature_node(features0)
        error = self.error_node(error0)
        recon = self.sae.decode(features) + error
        return act + (recon - recon0).to(act.dtype)


@dataclass
class NodeGroup:
    """One hook point holding a group of nodes per position.

    Attributes:
        name: e.g. ``"mlp_2"`` or ``"resid_1.features"``.
        module: the module hooked.
        use_input: whether the module's input (else its output) holds the activation.
        layer: the layer index (used to exclude early layers from evaluation).
        kind: ``attn``, ``mlp``, ``resid``; error nodes carry ``is_error``.
        sum_hidden: the group is one node per position (components, error nodes):
            attributions are summed over the hidden dimension.
    """

    name: str
    module: nn.Module
    use_input: bool
    layer: int
    kind: str
    sum_hidden: bool = False
    is_error: bool = False


class NodeSpace:
    """The node groups of one kind for a model, and the context that makes them live.

    Args:
        model: a Hugging Face causal LM.
        kind: ``components`` (attention and MLP outputs per layer and position),
            ``neurons`` (MLP hidden units) or ``features`` (SAE features and error nodes).
        saes: for ``features``: ``{"resid_0": sae, "attn_0": sae, "mlp_0": sae, ...}``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2))
        >>> [g.name for g in NodeSpace(model, "components").groups]
        ['attn_0', 'mlp_0', 'attn_1', 'mlp_1']
    """

    def __init__(self, model: nn.Module, kind: str, saes: Optional[Mapping[str, nn.Module]] = None) -> None:
        if kind not in NODE_KINDS:
            raise ValueError(f"nodes must be one of {NODE_KINDS}, got {kind!r}")
        self.model, self.kind = model, kind
        parts = model_components(model)
        self.n_layers = len(parts.blocks)
        self.splices: Dict[str, Tuple[nn.Module, SAESplice]] = {}
        self.groups: List[NodeGroup] = []
        for layer in range(self.n_layers):
            if kind == "components":
                self.groups.append(NodeGroup(f"attn_{layer}", parts.attn[layer], False, layer, "attn", True))
                self.groups.append(NodeGroup(f"mlp_{layer}", parts.mlp[layer], False, layer, "mlp", True))
            elif kind == "neurons":
                self.groups.append(NodeGroup(f"mlp_{layer}.neurons", _mlp_down_projection(parts.mlp[layer]),
                                             True, layer, "mlp"))
            else:
                self._add_features(saes or {}, layer, parts)

    def _add_features(self, saes: Mapping[str, nn.Module], layer: int, parts) -> None:
        points = {"resid": find_blocks(self.model)[layer], "attn": parts.attn[layer], "mlp": parts.mlp[layer]}
        for kind, host in points.items():
            key = f"{kind}_{layer}"
            if key not in saes:
                raise ValueError(f"saes has no dictionary {key!r} (have: {sorted(saes)})")
            _check_sae(key, saes[key], self.model)
            splice = SAESplice(saes[key])
            self.splices[key] = (host, splice)
            self.groups.append(NodeGroup(f"{key}.features", splice.feature_node, False, layer, kind))
            self.groups.append(NodeGroup(f"{key}.error", splice.error_node, False, layer, kind, True, True))

    @contextmanager
    def active(self) -> Iterator[None]:
        """Splice the SAEs into the model (no-op for components and neurons); undone on exit."""
        added = []
        try:
            with hooks_removed() as handles:
                for key, (host, splice) in self.splices.items():
                    splice.to(next(host.parameters(), torch.empty(0)).device)
                    name = f"relp_sae_{key}"
                    host.add_module(name, splice)
                    added.append((host, name))
                    handles.append(host.register_forward_hook(_splice_hook(splice)))
                yield
        finally:
            for host, name in added:
                delattr(host, name)

    def layers_and_flags(self) -> Tuple[List[nn.Module], List[bool]]:
        return [g.module for g in self.groups], [g.use_input for g in self.groups]

    def activations(self, forward: Callable[[], object]) -> List[Tensor]:
        """Every group's activation on one call of ``forward`` (SAEs spliced in), without gradients."""
        store: List[Optional[Tensor]] = [None] * len(self.groups)
        with torch.no_grad(), self.active(), layer_hooks(*self.layers_and_flags(), capture(store)):
            forward()
        return [t.detach() for t in store]  # type: ignore[union-attr]


def _check_sae(key: str, sae: nn.Module, model: nn.Module) -> None:
    """A named error for a dictionary that does not fit its hook point or holds NaN/inf weights."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    sae_width = getattr(sae, "d_model", getattr(sae, "activation_dim", None))
    if width is not None and sae_width is not None and int(sae_width) != int(width):
        raise ValueError(f"SAE {key!r} reads {int(sae_width)}-wide activations, but hook point {key} of "
                         f"{type(model).__name__} is {int(width)} wide")
    bad = [name for name, param in sae.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise ValueError(f"SAE {key!r} has non-finite (NaN or inf) weights in {bad}: every score would be NaN")


def _splice_hook(splice: SAESplice):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (splice(output[0]), *output[1:])
        return splice(output)

    return hook


def _mlp_down_projection(mlp: nn.Module) -> nn.Module:
    for name in ("down_proj", "c_proj", "dense_4h_to_h", "fc2"):
        module = getattr(mlp, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the down projection of {type(mlp).__name__} for neuron nodes")


@contextmanager
def ablated(space: NodeSpace, keep: Mapping[str, Tensor], means: Mapping[str, Tensor]) -> Iterator[None]:
    """Mean-ablate every node not kept: ``keep[name]`` is a bool ``(T, units)`` mask.

    Groups missing from ``keep`` are left untouched.
    """
    groups = [g for g in space.groups if g.name in keep]

    def replace(index: int, tensor: Tensor) -> Tensor:
        group = groups[index]
        mask = keep[group.name].to(tensor.device)
        mean = means[group.name].to(tensor.device, tensor.dtype)
        if group.sum_hidden:
            mask = mask.expand(mask.shape[0], tensor.shape[-1])
        return torch.where(mask, tensor, mean.expand_as(tensor))

    with layer_hooks([g.module for g in groups], [g.use_input for g in groups], replace):
        yield


def node_means(space: NodeSpace, forward, inputs: Sequence[Tensor]) -> Dict[str, Tensor]:
    """Mean activation of every group per position ``(T, width)`` over a batch of inputs."""
    return {g.name: t.float().mean(0) for g, t in zip(space.groups, space.activations(lambda: forward(*inputs)))}
