"""TransformerLens: RelP/AtP/AP on TransformerBridge (4.x) and HookedTransformer (3.x) equal HF.

The TransformerBridge tests run where transformer-lens 4.x is installed; the
HookedTransformer tests where 3.x is (it pins an older stack, so usually in a side venv).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from captum_relp import (
    LayerActivationPatching,
    LayerAttributionPatching,
    LayerRelevancePatching,
    UnsupportedModuleError,
    model_components,
)
from captum_relp.embedded import embedded_model_path
from captum_relp.rules.hookpoint import DetachHookRule, HookGatedRule, HookIdentityRule

tl = pytest.importorskip("transformer_lens")
MODELS = ("tiny-gpt2-ioi", "tiny-llama-ioi")


def _inputs(vocab: int):
    torch.manual_seed(0)
    return torch.randint(0, vocab, (2, 6)), torch.randint(0, vocab, (2, 6))


def _scores(model, method: str, x, xc):
    layers, flags, _ = model_components(model).select()
    kw = dict(baselines=xc, target=3, attribute_to_layer_input=flags)
    if method == "ap":
        return LayerActivationPatching(model, layers).attribute(x, **kw)
    if method == "atp":
        return LayerAttributionPatching(model, layers).attribute(x, **kw)
    return LayerRelevancePatching(model, layers, rules=method).attribute(x, **kw)


def _assert_match(got, want, method):
    for index, (g, w) in enumerate(zip(got, want)):
        if method != "ap":  # AP is per position; the others per hidden unit
            g, w = g.sum(-1), w.sum(-1)
        rel = ((g - w).abs().max() / w.abs().max()).item()
        assert rel < 1e-4, (method, index, rel)


def _hook_state(model: nn.Module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(getattr(m, "fwd_hooks", [])),
             "forward" in m.__dict__) for m in model.modules()]


@pytest.fixture(scope="module", params=MODELS)
def bridge_pair(request):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    path = embedded_model_path(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_mod.TransformerBridge.boot_transformers(str(path), device="cpu")
    return AutoModelForCausalLM.from_pretrained(path).eval(), bridge.eval()


@pytest.mark.parametrize("method", ["relp", "relp-ah", "atp", "ap"])
def test_bridge_matches_hf(bridge_pair, method):
    hf, bridge = bridge_pair
    x, xc = _inputs(hf.config.vocab_size)
    with torch.no_grad():
        bridge(x)  # transformers installs its output-capturing hooks on the first call
    before = _hook_state(bridge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge warns when a hook edits hook_scale
        got = _scores(bridge, method, x, xc)
    _assert_match(got, _scores(hf, method, x, xc), method)
    assert _hook_state(bridge) == before


def test_unregistered_hook_point_module_raises():
    from transformer_lens.hook_points import HookPoint

    class MyNorm(nn.Module):  # computes its norm in code, through a hook point
        def __init__(self):
            super().__init__()
            self.hook_scale = HookPoint()

        def forward(self, x):
            return x / self.hook_scale(x.pow(2).mean(-1, keepdim=True).sqrt())

    net = nn.Sequential(nn.Linear(4, 4), MyNorm(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match="MyNorm"):
        LayerRelevancePatching(net, net[0]).attribute(torch.randn(2, 4), target=0)


def test_hook_rules_need_their_hook_points():
    for rule in (DetachHookRule("hook_scale"), HookIdentityRule(), HookGatedRule()):
        with pytest.raises(ValueError, match="needs hook point"):
            rule.apply(nn.Linear(2, 2))


def _hooked_transformer(name: str):
    """HookedTransformer (TL 3.x) with the shipped model's weights, converted by TL itself."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as conv

    hf = AutoModelForCausalLM.from_pretrained(embedded_model_path(name)).eval()
    c = hf.config
    if name.startswith("tiny-gpt2"):
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
            d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
            normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False)
        state = conv.convert_gpt2_weights(hf, cfg)
    else:
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
            d_head=c.hidden_size // c.num_attention_heads, d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings, act_fn="silu",
            normalization_type="RMS", eps=c.rms_norm_eps, positional_embedding_type="rotary",
            rotary_dim=c.hidden_size // c.num_attention_heads, final_rms=True, gated_mlp=True,
            n_key_value_heads=c.num_key_value_heads, rotary_base=c.rope_parameters["rope_theta"]
            if getattr(c, "rope_parameters", None) else c.rope_theta, default_prepend_bos=False)
        state = conv.convert_llama_weights(hf, cfg)
    model = HookedTransformer(cfg)
    model.load_state_dict(state, strict=False)
    return hf, model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_hooked_transformer_matches_hf(name):
    try:
        from transformer_lens import HookedTransformer  # noqa: F401  (removed in TL 4)
    except ImportError:
        pytest.skip("HookedTransformer needs transformer-lens 3.x")
    hf, model = _hooked_transformer(name)
    x, xc = _inputs(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    before = _hook_state(model)
    for method in ("relp", "relp-ah", "atp"):
        _assert_match(_scores(model, method, x, xc), _scores(hf, method, x, xc), method)
    assert _hook_state(model) == before
