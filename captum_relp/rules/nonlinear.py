"""The rules for the nonlinear modules of a transformer (the paper's Table 4).

* **LN-rule** for LayerNorm and RMSNorm (Ali et al. 2022): the normalisation scale
  ``1 / sqrt(eps + Var[x])`` is treated as a constant in the backward pass, which makes
  the layer linear in ``x``. The forward output is computed by the module's own forward
  and therefore unchanged.
* **Identity-rule** for pointwise activations (Jafari et al. 2024, MambaLRP): ``act(x)``
  is rewritten as ``x * [act(x) / x]_const``: the backward pass multiplies the incoming
  gradient by ``act(x) / x``. At ``x = 0`` the ratio takes its limit ``act'(0)``, computed
  once per module by autograd, instead of dividing by ~0.
* **Half-rule** for multiplicative gates of gated MLPs (Arras et al. 2019; Jafari et al.
  2024): gated MLPs compute ``down_proj(act(gate_proj(x)) * up_proj(x))`` inline. The rule
  re-expresses that forward with the product routed through
  :func:`~captum_relp.rules.functional.half_product`, whose forward is the same product and
  whose backward gives each factor half of the product's gradient, so relevance is split
  equally instead of doubled. Where the gate and up projections are one fused linear layer
  (:class:`FusedGateRule`: Phi-3 computes ``down_proj(up * act(gate))`` with
  ``gate, up = gate_up_proj(x).chunk(2)``; ModernBERT ``Wo(drop(act(input) * gate))`` with
  ``input, gate = Wi(x).chunk(2)``) the product is routed the same way, same operands in the
  same order, so the forward is bit-identical.
* Final-logit soft-capping ``c * tanh(z / c)`` (Gemma 2 and 3, :class:`LogitSoftcapRule`) is a
  pointwise function with ``f(0) = 0``, computed inline after the unembedding: the
  Identity-rule multiplies the logits' gradient by ``f(z) / z`` (1 at ``z = 0``), so the
  relevance of the capped logit flows unchanged to the uncapped one. The rule is applied to
  the whole model: it records the unembedding output ``z`` and re-attaches the model's own
  capped logits to it.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import ForwardPatchRule, Rule, UndoFn
from .functional import compute_dtype, half_product, identity_ratio, identity_rule, ln_rule, slope_at_zero

GATED_MLP_ATTRIBUTES = ("gate_proj", "up_proj", "down_proj", "act_fn")


class LayerNormRule(ForwardPatchRule):
    """LN-rule for normalisation layers, with the scale treated as constant.

    Args:
        centered (bool): ``True`` for LayerNorm (mean subtracted), ``False`` for RMSNorm.
        weight_offset (float): added to the module's ``weight``; Gemma's RMSNorm
            multiplies by ``1 + weight`` and needs ``weight_offset=1.0``.
        eps (float, optional): the norm's epsilon, for modules that do not store it
            (default: the module's ``eps`` / ``variance_epsilon``).

    The module must normalise over its last dimension and expose ``weight``
    (or none) and ``eps`` / ``variance_epsilon``.

    Example:
        >>> import torch
        >>> from captum_relp.rules import LayerNormRule
        >>> ln = torch.nn.LayerNorm(4)
        >>> x = torch.randn(2, 4)
        >>> undo = LayerNormRule().apply(ln)
        >>> torch.equal(ln(x), torch.nn.functional.layer_norm(x, (4,), ln.weight, ln.bias))
        True
        >>> undo()
    """

    name = "ln"
    category = "norm"

    def __init__(self, centered: bool = True, weight_offset: float = 0.0, eps: Optional[float] = None) -> None:
        self.centered = centered
        self.weight_offset = weight_offset
        self.eps = eps

    def prepare(self, module: nn.Module, original: Callable) -> None:
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and len(tuple(shape)) != 1:
            raise ValueError(
                f"LayerNormRule supports normalisation over the last dimension only; "
                f"{type(module).__name__} has normalized_shape={tuple(shape)}"
            )

    def _eps(self, module: nn.Module, dtype: torch.dtype) -> float:
        if self.eps is not None:
            return self.eps
        for attr in ("eps", "variance_epsilon", "epsilon"):
            value = getattr(module, attr, None)
            if value is not None:
                return float(value)
        return float(torch.finfo(dtype).eps)

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        weight = getattr(module, "weight", None)
        if weight is not None:
            weight = weight.detach().to(compute_dtype(x.dtype)) + self.weight_offset
        return ln_rule(original, x, weight, self._eps(module, x.dtype), self.centered)

    def __repr__(self) -> str:
        eps = "" if self.eps is None else f", eps={self.eps}"
        return f"LayerNormRule(centered={self.centered}, weight_offset={self.weight_offset}{eps})"


def RMSNormRule(weight_offset: float = 0.0) -> LayerNormRule:
    """LN-rule for RMSNorm (no centering).

    Example:
        >>> RMSNormRule(weight_offset=1.0)
        LayerNormRule(centered=False, weight_offset=1.0)
    """
    return LayerNormRule(centered=False, weight_offset=weight_offset)


class IdentityRule(ForwardPatchRule):
    """Identity-rule: the nonlinear factor ``act(x) / x`` is treated as constant.

    Valid for activations with ``act(0) = 0`` (GELU variants, SiLU, ReLU, tanh).

    Example:
        >>> import torch
        >>> from captum_relp.rules import IdentityRule
        >>> act = torch.nn.GELU()
        >>> x = torch.tensor([0.0, 1.0], requires_grad=True)
        >>> undo = IdentityRule().apply(act)
        >>> act(x).sum().backward(); undo()
        >>> x.grad  # gelu(x) / x, with the limit 0.5 at x = 0
        tensor([0.5000, 0.8413])
    """

    name = "identity"
    category = "activation"

    def prepare(self, module: nn.Module, original: Callable) -> float:
        with torch.no_grad():
            at_zero = original(torch.zeros(1))
        if at_zero.abs().item() > 1e-6:
            raise ValueError(
                f"IdentityRule needs act(0) = 0, but {type(module).__name__}(0) = {at_zero.item():.4g}"
            )
        return slope_at_zero(original)

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        return identity_rule(original, x, state)


class HalfRule(ForwardPatchRule):
    """Half-rule for a gated MLP module with ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``.

    Works as a canonizer: the module's forward is replaced by an equivalent one
    (same operations, same order) in which the gate product is a :func:`half_product`.
    The activation ``act_fn`` stays a module call, so its own rule still applies.

    Example:
        >>> from captum_relp.rules import HalfRule
        >>> HalfRule().name
        'half'
    """

    name = "half"
    category = "gate"
    only_with_grad = False  # the canonized forward runs whenever the module is called

    def prepare(self, module: nn.Module, original: Callable) -> None:
        missing = [a for a in GATED_MLP_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise ValueError(
                f"HalfRule needs a gated MLP with attributes {GATED_MLP_ATTRIBUTES}; "
                f"{type(module).__name__} lacks {missing}"
            )

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        gate = module.act_fn(module.gate_proj(x))
        return module.down_proj(half_product(gate, module.up_proj(x)))


LAYOUTS: Dict[str, Tuple[str, str, str]] = {
    "gate_up_proj": ("gate_up_proj", "activation_fn", "down_proj"),
    "wi": ("Wi", "act", "Wo"),
}
"""``layout: (fused projection, activation, output projection)`` attribute names."""


class FusedGateRule(ForwardPatchRule):
    """Half-rule on a fused gated MLP (``layout`` one of :data:`LAYOUTS`).

    Example:
        >>> import torch
        >>> from captum_relp.rules.nonlinear import FusedGateRule
        >>> mlp = torch.nn.Module()
        >>> mlp.gate_up_proj, mlp.down_proj = torch.nn.Linear(2, 4), torch.nn.Linear(2, 2)
        >>> mlp.activation_fn = torch.nn.SiLU()
        >>> mlp.forward = lambda x: mlp.down_proj(torch.mul(*mlp.gate_up_proj(x).chunk(2, -1)[::-1]))
        >>> undo = FusedGateRule("gate_up_proj").apply(mlp); undo()
    """

    name = "half"
    category = "gate"

    def __init__(self, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        self.layout = layout

    def prepare(self, module: nn.Module, original: Callable) -> None:
        missing = [a for a in LAYOUTS[self.layout] if not hasattr(module, a)]
        if missing:
            raise ValueError(f"FusedGateRule({self.layout!r}): {type(module).__name__} lacks {missing}")

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x, *args: Any, **kwargs: Any):
        if self.layout == "gate_up_proj":
            gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
            return module.down_proj(half_product(up, module.activation_fn(gate)))
        inputs, gate = module.Wi(x).chunk(2, dim=-1)
        return module.Wo(module.drop(half_product(module.act(inputs), gate)))

    def __repr__(self) -> str:
        return f"FusedGateRule({self.layout!r})"


class _Recapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, capped):  # type: ignore[override]
        ctx.save_for_backward(identity_ratio(z, capped, 1.0).to(z.dtype))
        return capped.clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return grad_output * ratio, None


class LogitSoftcapRule(Rule):
    """Identity-rule on the final-logit soft-cap of a causal LM (``config.final_logit_softcapping``).

    Example:
        >>> from transformers import Gemma2Config, Gemma2ForCausalLM
        >>> model = Gemma2ForCausalLM(Gemma2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...     num_key_value_heads=1, head_dim=4, intermediate_size=8, vocab_size=16)).eval()
        >>> undo = LogitSoftcapRule().apply(model); undo()
    """

    name = "identity"
    category = "activation"

    def apply(self, module: nn.Module) -> UndoFn:
        remove = self.apply_with(module, _Recapped.apply)
        _SOFTCAP_RULED[module] = _SOFTCAP_RULED.get(module, 0) + 1

        def undo() -> None:
            remove()
            _SOFTCAP_RULED[module] -= 1
            if not _SOFTCAP_RULED[module]:
                del _SOFTCAP_RULED[module]

        return undo

    def apply_with(self, module: nn.Module, recap: Callable[[Tensor, Tensor], Tensor]) -> UndoFn:
        """Hook the model ``module`` so that, while its forward records gradients, its logits are
        ``recap(z, logits)``: ``z`` the unembedding output, ``logits`` the model's own capped logits.
        ``apply`` gives them the Identity-rule's backward to ``z``.

        Example:
            >>> import torch
            >>> from transformers import Gemma2Config, Gemma2ForCausalLM
            >>> model = Gemma2ForCausalLM(Gemma2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            ...     num_key_value_heads=1, head_dim=4, intermediate_size=8, vocab_size=16)).eval()
            >>> undo = LogitSoftcapRule().apply_with(model, lambda z, logits: z)  # the uncapped logits
            >>> ids = torch.tensor([[1, 2]])
            >>> z = model.lm_head(model.model(ids).last_hidden_state)
            >>> torch.equal(model(ids).logits, z); undo()
            True
        """
        head = module.get_output_embeddings()
        if not isinstance(head, nn.Module):
            raise ValueError(f"LogitSoftcapRule: {type(module).__name__} has no output embeddings")
        seen: Dict[str, Tensor] = {}

        def on_head(mod: nn.Module, args: Any, output: Tensor) -> None:
            seen["z"] = output

        def on_model(mod: nn.Module, args: Any, output: Any):
            z = seen.pop("z", None)
            logits = getattr(output, "logits", None)
            if z is None or logits is None or not torch.is_grad_enabled() or not z.requires_grad:
                return None
            if z.shape != logits.shape:
                raise RuntimeError(f"LogitSoftcapRule: unembedding output {tuple(z.shape)} is not the shape "
                                   f"of the logits {tuple(logits.shape)}")
            output.logits = recap(z, logits)
            return output

        handles = [head.register_forward_hook(on_head), module.register_forward_hook(on_model)]

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove


_SOFTCAP_RULED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
"""Models with a :class:`LogitSoftcapRule` applied (how many times)."""


def softcap_logits(model: nn.Module, z: Tensor, cap: Optional[float]) -> Tensor:
    """``cap * tanh(z / cap)`` for logits computed outside ``model``'s forward (edge graphs), with the
    Identity-rule's backward while a :class:`LogitSoftcapRule` is applied to ``model``.

    Example:
        >>> import torch
        >>> softcap_logits(torch.nn.Linear(1, 1), torch.tensor([0.0, 100.0]), 5.0)
        tensor([0., 5.])
    """
    if not cap:
        return z
    logits = torch.tanh(z / cap) * cap
    if model in _SOFTCAP_RULED and torch.is_grad_enabled() and z.requires_grad:
        return _Recapped.apply(z, logits)
    return logits
