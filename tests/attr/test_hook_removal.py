"""Generated state-restoration test (in the style of Captum's ``test_hook_removal.py``).

For every method x every supported family x {success, an exception raised in the
forward, in the backward, in the metric}: no hook is left on any module, no
instance ``forward``, every ``requires_grad``, ``.training`` and the attention
implementation are as before, and the forward output is bit-identical.
"""
from __future__ import annotations

import pytest
import torch
from tests.conftest import FAMILIES, build_model, token_pair

from captum_relp import model_components
from captum_relp.attr import METHODS

MODES = ("success", "forward", "backward", "metric")


class _Boom(RuntimeError):
    pass


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise _Boom("raised in the backward pass")


def full_state(model: torch.nn.Module):
    """Everything an attribution call could leave changed."""
    return {
        "instance_forward": [n for n, m in model.named_modules() if "forward" in m.__dict__],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "global_hooks": (len(torch.nn.modules.module._global_forward_hooks),
                         len(torch.nn.modules.module._global_forward_pre_hooks),
                         len(torch.nn.modules.module._global_backward_hooks)),
    }


def _metric(mode: str):
    def metric(logits: torch.Tensor) -> torch.Tensor:
        if mode == "metric":
            raise _Boom("raised in the metric")
        values = logits[:, -1, 1] - logits[:, -1, 2]
        return _RaiseInBackward.apply(values) if mode == "backward" else values

    return metric


def _arm_forward_error(model, mode: str):
    """A user hook (present before and after) that raises inside the forward in mode 'forward'."""
    armed = {"on": False}

    def hook(module, args, output):
        if armed["on"] and mode == "forward":
            raise _Boom("raised in the forward pass")

    handle = model_components(model).blocks[-1].register_forward_hook(hook)
    return armed, handle


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_state_restored(family, method, mode):
    model = build_model(family)
    model.get_output_embeddings().train()  # mixed train/eval state (a Linear: no dropout to change outputs)
    first = next(model.parameters())
    first.requires_grad_(False)  # mixed grad flags
    clean, corrupt = token_pair(batch=2, seq=5)
    parts = model_components(model)
    layers = [parts.blocks[-1], parts.mlp[0], parts.attn[-1]]
    flags = [True, False, True]
    armed, handle = _arm_forward_error(model, mode)
    with torch.no_grad():
        before_logits = model(clean).logits
    before = full_state(model)

    armed["on"] = True
    call = lambda: METHODS[method].attribute(  # noqa: E731
        model, layers, clean, baselines=corrupt, metric=_metric(mode), attribute_to_layer_input=flags,
        n_steps=2, internal_batch_size=8)
    if mode == "success" or (mode == "backward" and method == "AP"):  # AP runs no backward pass
        scores = call()
        assert len(scores) == 3 and all(torch.isfinite(s).all() for s in scores)
    else:
        with pytest.raises(_Boom):
            call()
    armed["on"] = False

    assert full_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(clean).logits, before_logits)
    handle.remove()


def test_state_check_can_fail():
    """The state comparison notices a left-over hook, forward patch and flag."""
    model = build_model("gpt2")
    before = full_state(model)
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    assert full_state(model) != before
    handle.remove()
    model.lm_head.forward = model.lm_head.forward
    assert full_state(model) != before
    del model.lm_head.forward
    next(model.parameters()).requires_grad_(False)
    assert full_state(model) != before
