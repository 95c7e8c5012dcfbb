"""Each rule: forward bit-identical, backward equal to the hand-derived coefficient."""
import math

import pytest
import torch
from transformers.activations import GELUTanh, NewGELUActivation, SiLUActivation
from transformers.pytorch_utils import Conv1D

from captum_relp.rules import (
    AHRule,
    EpsilonRule,
    GammaRule,
    HalfRule,
    IdentityRule,
    LayerNormRule,
    RMSNormRule,
)


def _grad_through(module, rule, x, grad_out=None):
    x = x.clone().requires_grad_(True)
    undo = rule.apply(module)
    try:
        out = module(x)
        out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    finally:
        undo()
    assert "forward" not in module.__dict__
    return out.detach(), x.grad


@pytest.mark.parametrize("act", [torch.nn.GELU(), NewGELUActivation(), GELUTanh(), SiLUActivation(), torch.nn.ReLU()])
def test_identity_rule_gradient_is_ratio_with_limit_at_zero(act):
    x = torch.tensor([-2.0, -0.5, 0.0, 1e-9, 0.7, 3.0])
    out, grad = _grad_through(act, IdentityRule(), x)
    assert torch.equal(out, act(x))
    expected = act(x) / x
    slope = 0.0 if isinstance(act, torch.nn.ReLU) else 0.5  # act'(0) for GELU/SiLU variants
    expected[2] = expected[3] = slope
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected)


def test_identity_rule_rejects_activation_with_nonzero_at_zero():
    with pytest.raises(ValueError, match="act\\(0\\) = 0"):
        IdentityRule().apply(torch.nn.Sigmoid())


def test_ln_rule_matches_hand_derivation():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(5)
    torch.nn.init.normal_(ln.weight)
    x, g = torch.randn(3, 5), torch.randn(3, 5)
    out, grad = _grad_through(ln, LayerNormRule(), x, g)
    assert torch.equal(out, ln(x))
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    wg = g * ln.weight.detach()
    torch.testing.assert_close(grad, (wg - wg.mean(-1, keepdim=True)) / sigma)
    # the plain gradient differs (it also differentiates sigma)
    plain = x.clone().requires_grad_(True)
    ln(plain).backward(g)
    assert not torch.allclose(plain.grad, grad)


def test_rmsnorm_rule_with_gemma_offset():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    torch.manual_seed(0)
    norm = Gemma2RMSNorm(4)
    torch.nn.init.normal_(norm.weight)
    x, g = torch.randn(2, 4), torch.randn(2, 4)
    out, grad = _grad_through(norm, RMSNormRule(weight_offset=1.0), x, g)
    assert torch.equal(out, norm(x))
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(grad, g * (1.0 + norm.weight.detach()) / rms)


def test_ln_rule_conserves_relevance_without_bias():
    ln = torch.nn.LayerNorm(6, bias=False)
    torch.nn.init.normal_(ln.weight)
    x, g = torch.randn(2, 6), torch.randn(2, 6)
    out, grad = _grad_through(ln, LayerNormRule(), x, g)
    torch.testing.assert_close((x * grad).sum(-1), (out * g).sum(-1))


class _GatedMLP(torch.nn.Module):
    def __init__(self, width=4, hidden=6):
        super().__init__()
        self.gate_proj = torch.nn.Linear(width, hidden, bias=False)
        self.up_proj = torch.nn.Linear(width, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, width, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_half_rule_forward_identical_and_gradient_halved():
    torch.manual_seed(0)
    mlp = _GatedMLP()
    x = torch.randn(3, 4)
    with torch.no_grad():
        reference = mlp(x)
    # Half-rule alone: with a linear "activation" the gate product's gradient is halved exactly
    mlp.act_fn = torch.nn.Identity()
    out, grad = _grad_through(mlp, HalfRule(), x)
    xr = x.clone().requires_grad_(True)
    mlp(xr).sum().backward()
    torch.testing.assert_close(grad, 0.5 * xr.grad)
    mlp.act_fn = torch.nn.SiLU()
    out, _ = _grad_through(mlp, HalfRule(), x)
    assert torch.equal(out, reference)


def test_half_rule_needs_gated_mlp():
    with pytest.raises(ValueError, match="gate_proj"):
        HalfRule().apply(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("module", [torch.nn.Linear(4, 3), Conv1D(3, 4)])
def test_epsilon_rule(module):
    torch.manual_seed(0)
    x, g = torch.randn(5, 4), torch.randn(5, 3)
    out, grad = _grad_through(module, EpsilonRule(0.0), x, g)
    assert torch.equal(out, module(x))
    xr = x.clone().requires_grad_(True)
    module(xr).backward(g)
    torch.testing.assert_close(grad, xr.grad)  # eps = 0 is the 0-rule
    _, grad_eps = _grad_through(module, EpsilonRule(10.0), x, g)
    z = module(x).detach()
    weight = module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()
    expected = (g * z / (z + 10.0 * torch.where(z >= 0, 1.0, -1.0))) @ weight
    torch.testing.assert_close(grad_eps, expected)


def test_gamma_rule_zero_gamma_is_zero_rule_for_biasless_linear():
    lin = torch.nn.Linear(4, 3, bias=False)
    x, g = torch.randn(5, 4), torch.randn(5, 3)
    _, grad = _grad_through(lin, GammaRule(0.0), x, g)
    torch.testing.assert_close(grad, g @ lin.weight.detach(), rtol=1e-4, atol=1e-4)
    _, boosted = _grad_through(lin, GammaRule(1.0), x, g)
    assert not torch.allclose(boosted, grad)


@pytest.mark.parametrize("conv", [False, True])
def test_gamma_rule_at_gamma_one_by_hand(conv):
    """W = [[1, -2], [3, 0.5]], b = [0.5, -1], x = [1, 2], g = [1, 1]: z = [-2.5, 3];
    W' = W + W+ = [[2, -2], [6, 1]], z' = W' x + b = [-1.5, 7];
    dx = W'^T (g z / z') = [2 * 5/3 + 6 * 3/7, -2 * 5/3 + 3/7] = [124/21, -61/21]."""
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    if conv:
        module = Conv1D(2, 2).double()
        module.weight.data.copy_(weight.t())  # Conv1D stores (in, out)
    else:
        module = torch.nn.Linear(2, 2).double()
        module.weight.data.copy_(weight)
    module.bias.data.copy_(torch.tensor([0.5, -1.0]))
    x, g = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    out, grad = _grad_through(module, GammaRule(1.0, stabilizer=0.0), x, g)
    assert out.tolist() == [[-2.5, 3.0]]
    torch.testing.assert_close(grad, torch.tensor([[124 / 21, -61 / 21]], dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ah_rule_blocks_query_key_gradients_and_keeps_mask(attn):
    from tests.conftest import build_model, token_pair

    model = build_model("llama", attn_implementation=attn)
    clean, _ = token_pair(batch=2, seq=5)
    mask = torch.ones_like(clean)
    mask[0, 3:] = 0
    grads = {}

    def record(name):
        def hook(module, args, output):
            output.register_hook(lambda g: grads.setdefault(name, g))
        return hook

    attention = model.model.layers[1].self_attn
    handles = [getattr(attention, f"{name}_proj").register_forward_hook(record(name)) for name in "qkv"]
    embeds = model.get_input_embeddings()(clean).detach().requires_grad_(True)
    undo = AHRule().apply(model)
    try:
        assert model.config._attn_implementation == f"relp_ah_{attn}"
        out = model(inputs_embeds=embeds, attention_mask=mask).logits
        out[:, -1].sum().backward()
    finally:
        undo()
        for handle in handles:
            handle.remove()
    assert model.config._attn_implementation == attn
    assert sorted(grads) == ["v"]  # queries and keys are detached: no gradient reaches q_proj or k_proj
    assert grads["v"].abs().sum() > 0
    assert embeds.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(out.detach(), model(inputs_embeds=embeds, attention_mask=mask).logits)
    assert math.isfinite(float(out.detach().sum()))


def test_ah_rule_needs_hf_model():
    with pytest.raises(ValueError, match="config"):
        AHRule().apply(torch.nn.Linear(2, 2))
