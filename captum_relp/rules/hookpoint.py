"""Hook-based rules for models that compute in their own code (TransformerLens).

TransformerLens' ``HookedTransformer`` (3.x) and ``TransformerBridge`` (4.x) compute
normalisation, attention patterns and MLP activations in Python code rather than in
modules a forward patch could replace, but every intermediate passes through a
``HookPoint``. These rules act on those hook points of a module (its ``hook_scale``,
``hook_pattern``, ``hook_pre``/``hook_post``), leaving the forward value unchanged:

* :class:`DetachHookRule`: the hooked tensor is a constant in the backward pass —
  on ``hook_scale`` the LN-rule, on ``hook_pattern`` the AH-rule;
* :class:`HookIdentityRule`: ``hook_post = act(hook_pre)`` gets the Identity-rule's
  backward ``grad * post / pre``;
* :class:`HookGatedRule`: ``hook_post = act(hook_pre) * hook_pre_linear`` gets the
  Half-rule on the product and the Identity-rule on ``act``.

Hooks are added with TransformerLens' own ``add_hook`` when the hook point has it
(its bridges check their hook lists to decide whether an edit must propagate) and
removed one by one, so user hooks stay in place.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn

from .base import Rule, UndoFn, ZeroRule
from .functional import identity_ratio

HookFn = Callable[[Tensor], Any]


def _grad_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` (only) in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach()).to(value.dtype)


def add_forward_hook(hook_point: nn.Module, fn: HookFn) -> UndoFn:
    """Add ``fn(tensor) -> tensor or None`` as a forward hook of ``hook_point``; returns its undo.

    Example:
        >>> import torch
        >>> undo = add_forward_hook(torch.nn.Identity(), lambda t: t * 2)
        >>> undo()
    """
    fwd_hooks = getattr(hook_point, "fwd_hooks", None)
    if hasattr(hook_point, "add_hook") and isinstance(fwd_hooks, list):
        before = list(fwd_hooks)
        hook_point.add_hook(lambda tensor, hook: fn(tensor), dir="fwd")
        added = [h for h in fwd_hooks if all(h is not b for b in before)]

        def undo() -> None:
            for handle in added:
                handle.hook.remove()
                if handle in fwd_hooks:
                    fwd_hooks.remove(handle)

        return undo
    handle = hook_point.register_forward_hook(lambda module, args, output: fn(output))
    return handle.remove


class HookPointRule(Rule):
    """Base of the hook-based rules: the hook points named in ``hooks`` must exist.

    Args:
        hooks: Attribute names of the module's hook points the rule uses.

    Example:
        >>> import torch
        >>> DetachHookRule("hook_scale").hook_points(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: DetachHookRule needs hook point(s) ['hook_scale'] on Linear, which has none
    """

    name = "hook"
    hooks: Sequence[str] = ()

    @property
    def category(self) -> str:  # type: ignore[override]
        """``attention`` on ``hook_pattern``, ``norm`` on ``hook_scale``, else ``custom``."""
        return "attention" if "hook_pattern" in self.hooks else "norm" if "hook_scale" in self.hooks else "custom"

    def hook_points(self, module: nn.Module) -> Dict[str, nn.Module]:
        """The module's hook points by name; ValueError when one is missing (never a silent no-op)."""
        found = {name: getattr(module, name, None) for name in self.hooks}
        missing = [name for name, point in found.items() if not isinstance(point, nn.Module)]
        if missing:
            raise ValueError(f"{type(self).__name__} needs hook point(s) {missing} on "
                             f"{type(module).__name__}, which has none")
        return found  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.hooks))})"


class DetachHookRule(HookPointRule):
    """The hooked tensors are constants in the backward pass.

    Args:
        hooks: e.g. ``("hook_scale",)`` (LN-rule) or ``("hook_pattern",)`` (AH-rule).

    Example:
        >>> DetachHookRule("hook_scale")
        DetachHookRule('hook_scale')
    """

    name = "detach"

    def __init__(self, *hooks: str) -> None:
        self.hooks = hooks

    def apply(self, module: nn.Module) -> UndoFn:
        undos = [add_forward_hook(point, lambda t: t.detach() if t.requires_grad else None)
                 for point in self.hook_points(module).values()]
        return lambda: [undo() for undo in reversed(undos)] and None


class HookIdentityRule(HookPointRule):
    """Identity-rule on an MLP's activation between ``hook_pre`` and ``hook_post``.

    Example:
        >>> HookIdentityRule().name
        'identity'
    """

    name = "identity"
    hooks = ("hook_pre", "hook_post")

    def apply(self, module: nn.Module) -> UndoFn:
        points = self.hook_points(module)
        seen: List[Tensor] = []

        def pre(tensor: Tensor) -> None:
            seen[:] = [tensor]

        def post(tensor: Tensor):
            if not seen or not tensor.requires_grad:
                return None
            x = seen.pop()
            ratio = identity_ratio(x.detach(), tensor.detach(), 0.5).to(x.dtype)
            return _grad_through(tensor, x * ratio)

        undos = [add_forward_hook(points["hook_pre"], pre), add_forward_hook(points["hook_post"], post)]
        return lambda: [undo() for undo in reversed(undos)] and None


class HookGatedRule(HookPointRule):
    """Half-rule + Identity-rule for ``hook_post = act(hook_pre) * hook_pre_linear`` (gated MLPs).

    The module must have ``act_fn`` (TransformerLens' ``GatedMLP``).

    Example:
        >>> HookGatedRule().name
        'half'
    """

    name = "half"
    hooks = ("hook_pre", "hook_pre_linear", "hook_post")

    def apply(self, module: nn.Module) -> UndoFn:
        points = self.hook_points(module)
        act_fn = getattr(module, "act_fn", None)
        if not callable(act_fn):
            raise ValueError(f"HookGatedRule needs act_fn on {type(module).__name__}")
        seen: Dict[str, Tensor] = {}

        def post(tensor: Tensor):
            if len(seen) < 2 or not tensor.requires_grad:
                return None
            gate, linear = seen.pop("hook_pre"), seen.pop("hook_pre_linear")
            with torch.no_grad():
                act = act_fn(gate)
                ratio = identity_ratio(gate, act, 0.5).to(gate.dtype)
            gate_branch = gate * ratio * linear.detach()
            linear_branch = act * linear
            return _grad_through(tensor, 0.5 * gate_branch + 0.5 * linear_branch)

        undos = [add_forward_hook(points["hook_pre"], partial(seen.__setitem__, "hook_pre")),
                 add_forward_hook(points["hook_pre_linear"], partial(seen.__setitem__, "hook_pre_linear")),
                 add_forward_hook(points["hook_post"], post)]
        return lambda: [undo() for undo in reversed(undos)] and None


TRANSFORMER_LENS_ENTRIES: dict = {}
"""Registry entries ``{type key: (category, rule factory)}`` for TransformerLens classes."""
# TransformerLens computes in its own code, through HookPoints: hook-based rules, keyed by
# TL class names (3.x HookedTransformer components; 4.x TransformerBridge components).
_TL3 = "transformer_lens.components."
_TL4 = "transformer_lens.model_bridge.generalized_components."
for _name in ("layer_norm.LayerNorm", "layer_norm_pre.LayerNormPre", "rms_norm.RMSNorm",
              "rms_norm_pre.RMSNormPre"):
    TRANSFORMER_LENS_ENTRIES[_TL3 + _name] = ("norm", lambda: DetachHookRule("hook_scale"))
for _name in ("normalization.NormalizationBridge", "rms_normalization.RMSNormalizationBridge"):
    TRANSFORMER_LENS_ENTRIES[_TL4 + _name] = ("norm", lambda: DetachHookRule("hook_scale"))
for _key in (_TL3 + "attention.Attention", _TL3 + "grouped_query_attention.GroupedQueryAttention",
             _TL4 + "attention.AttentionBridge", _TL4 + "joint_qkv_attention.JointQKVAttentionBridge",
             _TL4 + "position_embeddings_attention.PositionEmbeddingsAttentionBridge",
             _TL4 + "joint_qkv_position_embeddings_attention.JointQKVPositionEmbeddingsAttentionBridge"):
    TRANSFORMER_LENS_ENTRIES[_key] = ("attention", lambda: DetachHookRule("hook_pattern"))
TRANSFORMER_LENS_ENTRIES[_TL3 + "mlps.mlp.MLP"] = ("activation", HookIdentityRule)
TRANSFORMER_LENS_ENTRIES[_TL3 + "mlps.gated_mlp.GatedMLP"] = ("gate", HookGatedRule)
# hook points are identities (rules above act through them); TL 3.x embeddings/unembedding are linear
for _key in ("transformer_lens.hook_points.HookPoint", _TL3 + "embed.Embed", _TL3 + "pos_embed.PosEmbed",
             _TL3 + "unembed.Unembed", _TL3 + "token_typed_embed.TokenTypeEmbed"):
    TRANSFORMER_LENS_ENTRIES[_key] = ("structural", None)
# the bridge's gated MLP runs the Hugging Face MLP inside, which carries the Half-rule
TRANSFORMER_LENS_ENTRIES[_TL4 + "gated_mlp.GatedMLPBridge"] = ("gate", ZeroRule)


__all__ = ["TRANSFORMER_LENS_ENTRIES", "HookPointRule", "DetachHookRule", "HookIdentityRule", "HookGatedRule",
           "add_forward_hook"]
