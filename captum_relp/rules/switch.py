"""Several rule sets on one forward pass: the backward pass follows the one selected.

Scoring the candidates of a calibration (:func:`~captum_relp.calibrate_rules`) needs the
coefficients of the same run under up to 16 rule sets. Rules never change forward values,
only the backward pass, so the forward pass can be shared. :func:`switch_rules` applies every
candidate at once:

* a module the candidates give different forward-patch rules (the LN-, Identity- and
  Half-rule) runs each distinct variant of its forward on the same input, checks that their
  outputs are equal, and returns a copy whose backward pass routes the gradient to the
  variant of the selected candidate only;
* the AH-rule (Hugging Face attention), the AH-rule on query/key projection columns and the
  Identity-rule on a final-logit soft-cap become gates: the forward value passes unchanged,
  and the backward pass drops the gradient (or rescales it) only while a candidate with that
  rule is selected.

:meth:`RuleSwitch.select` picks the candidate before each backward pass over the kept graph.
The checks of :func:`~captum_relp.apply_rules` (coverage, patterns, overrides, refusals) run
for every candidate. What cannot be switched raises :class:`SwitchUnsupported` before any
forward pass: a rule outside this package, a TransformerLens hook rule, an attention rule
other than :class:`~captum_relp.rules.AHRule`, a site inside a module with several variants.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import families
from .attention import AHRule, DetachQKColumnsRule, register_ah_attention, require_ah_calls
from .base import ForwardPatchRule, UndoFn, UnsupportedModuleError, ZeroRule, forward_attribute, \
    set_instance_attribute
from .composites import RuleSet, check_coverage, ruled
from .functional import identity_ratio
from .nonlinear import LogitSoftcapRule
from .registry import registered_category

_SWITCH_PREFIX = "relp_switch_"
_ACTIVE = threading.local()  # the (switch, table) of the AH gate while a switched forward runs


class SwitchUnsupported(ValueError):
    """The candidates cannot share one forward pass (score them one pass each)."""


class RuleSwitch:
    """The candidate whose rules the next backward pass follows.

    Example:
        >>> switch = RuleSwitch(["gradient", "relp"])
        >>> switch.select(1); switch.index, switch.names[switch.index]
        (1, 'relp')
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.index = 0

    def select(self, index: int) -> None:
        """Follow candidate ``index`` in the backward passes from now on."""
        if not 0 <= index < len(self.names):
            raise IndexError(f"candidate index {index} out of range for {len(self.names)} candidates")
        self.index = index


class _Select(torch.autograd.Function):
    """Forward: a copy of the first variant's output. Backward: the gradient to the variant
    ``table[switch.index]`` only."""

    @staticmethod
    def forward(ctx, switch, table, *outputs):  # type: ignore[override]
        ctx.switch, ctx.table, ctx.n = switch, table, len(outputs)
        return outputs[0].clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        chosen = ctx.table[ctx.switch.index]
        return (None, None) + tuple(grad if i == chosen else None for i in range(ctx.n))


class _Gate(torch.autograd.Function):
    """Forward: a copy. Backward: while ``table[switch.index]`` holds, no gradient (or none at
    ``mask``); otherwise the gradient as it is."""

    @staticmethod
    def forward(ctx, x, switch, table, mask):  # type: ignore[override]
        ctx.switch, ctx.table, ctx.mask = switch, table, mask
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.table[ctx.switch.index]:
            return grad, None, None, None
        return (None if ctx.mask is None else grad.masked_fill(ctx.mask, 0)), None, None, None


class _SwitchRecapped(torch.autograd.Function):
    """The soft-capped logits: the Identity-rule's backward to the uncapped ``z`` while
    ``table[switch.index]`` holds, the model's own graph otherwise."""

    @staticmethod
    def forward(ctx, z, capped, switch, table):  # type: ignore[override]
        ctx.save_for_backward(identity_ratio(z, capped, 1.0).to(z.dtype))
        ctx.switch, ctx.table = switch, table
        return capped.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.table[ctx.switch.index]:
            (ratio,) = ctx.saved_tensors
            return grad * ratio, None, None, None
        return None, grad, None, None


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _variant_key(rule: Any) -> Any:
    """Rules of this package with equal class and parameters (their ``repr``) share a variant."""
    if rule is None or type(rule) is ZeroRule:
        return None
    if not isinstance(rule, ForwardPatchRule) or not type(rule).__module__.startswith(__package__):
        raise SwitchUnsupported(f"{rule!r} is not a forward-patch rule of captum_relp.rules: the candidates "
                                "cannot share one forward pass")
    return (type(rule), repr(rule))


def _switch_module(module: nn.Module, name: str, rules: Sequence[Any], switch: RuleSwitch) -> Tuple[UndoFn, int]:
    """Install the variants of ``module``'s forward; returns the undo and the variant count."""
    keys = [_variant_key(rule) for rule in rules]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        rule = rules[0]
        return (lambda: None) if distinct[0] is None else rule.apply(module), 1
    attribute = forward_attribute(module)
    functions = []
    for key in distinct:
        if key is None:
            functions.append(getattr(module, attribute))
            continue
        undo = rules[keys.index(key)].apply(module)
        functions.append(getattr(module, attribute))
        undo()
    table = [distinct.index(key) for key in keys]

    def forward(*args: Any, **kwargs: Any):
        outputs = [function(*args, **kwargs) for function in functions]
        if not all(isinstance(o, Tensor) for o in outputs):
            raise SwitchUnsupported(f"{name} ({type(module).__name__}) returns {type(outputs[0]).__name__}, "
                                    "not a tensor: its rule variants cannot be switched")
        if not all(_same(outputs[0], o) for o in outputs[1:]):
            raise RuntimeError(f"the rule variants of {name} ({type(module).__name__}) give different forward "
                               "outputs: a rule changed the forward pass")
        if not any(o.requires_grad for o in outputs):
            return outputs[0]
        return _Select.apply(switch, table, *outputs)

    return set_instance_attribute(module, attribute, forward), len(distinct)


def _gate_columns(module: nn.Module, rule: DetachQKColumnsRule, switch: RuleSwitch, table: List[bool]) -> UndoFn:
    """The AH-rule on query/key projection columns, as a gate."""
    def gate(output: Tensor, mask: Tensor) -> Tensor:
        return _Gate.apply(output, switch, table, mask) if output.requires_grad else output

    return rule.apply_with(module, gate)


def _gated_qk(query: Tensor, key: Tensor) -> Tuple[Tensor, Tensor]:
    state = getattr(_ACTIVE, "ah", None)
    if state is None:
        raise RuntimeError("a switched attention function ran outside switch_rules")
    return tuple(t if not t.requires_grad else _Gate.apply(t, *state, None) for t in (query, key))  # type: ignore


def _gate_attention(model: nn.Module, switch: RuleSwitch, table: List[bool]) -> UndoFn:
    """The AH-rule of Hugging Face attention, as a gate on queries and keys."""
    config = model.config
    original = config._attn_implementation
    config._attn_implementation = register_ah_attention(str(original or "eager"), _gated_qk, _SWITCH_PREFIX)
    previous = getattr(_ACTIVE, "ah", None)
    _ACTIVE.ah = (switch, table)

    def undo() -> None:
        config._attn_implementation = original
        _ACTIVE.ah = previous

    return undo


def _gate_softcap(model: nn.Module, switch: RuleSwitch, table: List[bool]) -> UndoFn:
    """The Identity-rule on the final-logit soft-cap, as a switch."""
    return LogitSoftcapRule().apply_with(model, lambda z, logits: _SwitchRecapped.apply(z, logits, switch, table))


def _inside(path: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or path.startswith(p + ".") for p in prefixes)


@contextmanager
def switch_rules(model: nn.Module, candidates: Sequence[RuleSet], strict: bool = True,
                 sites: Sequence[nn.Module] = ()) -> Iterator[RuleSwitch]:
    """Apply every candidate rule set to ``model`` at once for the ``with`` block.

    Forward values are unchanged. The backward pass follows the candidate chosen with
    :meth:`RuleSwitch.select` (the first one until then); it gives, over one kept graph, the
    same gradients as :func:`~captum_relp.apply_rules` with that candidate alone.

    Args:
        model: the model.
        candidates: the rule sets (:class:`~captum_relp.RuleSet`).
        strict: as in :func:`~captum_relp.apply_rules`.
        sites: modules whose hooks read activations: none may sit inside a module with several
            forward variants (its hooks would run once per variant).

    Raises:
        SwitchUnsupported: the candidates cannot share a forward pass (raised on entry).

    Example:
        >>> import torch
        >>> from captum_relp import RuleSet
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GELU(), torch.nn.Linear(3, 1))
        >>> x = torch.tensor([[1.0, -2.0]], requires_grad=True)
        >>> with switch_rules(net, [RuleSet("gradient", categories=()), RuleSet("relp")]) as switch:
        ...     out = net(x).sum()
        ...     plain = torch.autograd.grad(out, x, retain_graph=True)[0]
        ...     switch.select(1)
        ...     relp = torch.autograd.grad(out, x)[0]
        >>> with torch.no_grad(): torch.equal(out, net(x).sum())
        True
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("switch_rules needs at least one candidate rule set")
    for ruleset in candidates:
        ruleset.check_patterns(model)
        ruleset.check_overrides(model)
        check_coverage(model, ruleset, strict)
        if ruleset.attention is not None:
            if type(ruleset.attention) is not AHRule:
                raise SwitchUnsupported(f"candidate {ruleset.name!r}: attention rule {ruleset.attention!r} "
                                        "cannot be switched (only AHRule)")
            refusal = families.ah_refusal(model)
            if refusal is not None:
                raise UnsupportedModuleError(refusal)
    switch = RuleSwitch([c.name for c in candidates])
    site_paths = [p for p, m in model.named_modules() if any(m is s for s in sites)]
    with ruled(model):
        undos: List[UndoFn] = []
        try:
            plain = families.gradient_paths(model)
            switched: List[str] = []
            for path, module in model.named_modules():
                rules = [c.rule_for(module, path, plain) for c in candidates]
                if any(r is not None and registered_category(type(module)) == "attention" for r in rules):
                    raise SwitchUnsupported(f"{path} ({type(module).__name__}): per-module attention rules "
                                            "cannot be switched")
                undo, variants = _switch_module(module, path or type(model).__name__, rules, switch)
                undos.append(undo)
                if variants > 1:
                    switched.append(path)
            inner = [p for p in site_paths if _inside(p, switched)]
            if inner:
                raise SwitchUnsupported(f"the sites {inner} lie inside modules with several rule variants")
            ah = [c.attention is not None for c in candidates]
            if any(ah):
                for module, rule in families.ah_module_rules(model):
                    undos.append(_gate_columns(module, rule, switch, ah))
                if families.switches_attention_function(model):
                    if not hasattr(getattr(model, "config", None), "_attn_implementation"):
                        raise SwitchUnsupported(f"{type(model).__name__} has no Hugging Face config: its "
                                                "attention cannot be switched")
                    undos.append(_gate_attention(model, switch, ah))
                    undos.append(require_ah_calls(model))
            capped = [bool(families.model_rules(model, c.categories)) for c in candidates]
            if any(capped):
                undos.append(_gate_softcap(model, switch, capped))
            yield switch
        finally:
            for undo in reversed(undos):
                undo()


__all__ = ["switch_rules", "RuleSwitch", "SwitchUnsupported"]
