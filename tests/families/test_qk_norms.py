"""Query/key norms take the plain gradient under ``relp``: the attention scores stay invariant to
the scale of the norm's input (Euler: ``x . d score / dx = 0``), which the LN-rule would break."""
import pytest
import torch

from captum_relp import RuleSet, apply_rules, model_components
from captum_relp.families import FAMILY_TABLE, gradient_paths
from captum_relp.rules import LayerNormRule
from tests.families.configs import tiny_model, token_pair
from tests.families.oracles import target_logits

QK_FAMILIES = sorted(t for t, family in FAMILY_TABLE.items() if family.qk_norms)
TARGET = 5


def test_the_families_with_query_key_norms():
    assert QK_FAMILIES == ["gemma3_text", "olmo2", "phi", "qwen3", "stablelm"]


def euler_sums(model, rules) -> torch.Tensor:
    """``x . grad / (|x| |grad|)`` of the explained logit, for each query/key norm input vector ``x``."""
    clean, _, mask = token_pair()
    leaves = []

    def leaf(module, args):
        x = args[0].detach().requires_grad_(True)
        leaves.append(x)
        return (x,)

    norms = [model.get_submodule(path) for path in sorted(gradient_paths(model))]
    assert len(norms) == 2 * len(model_components(model).blocks)
    handles = [norm.register_forward_pre_hook(leaf) for norm in norms]
    try:
        with torch.enable_grad(), apply_rules(model, rules):
            target_logits(model, clean, mask, TARGET).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    cosines = [(x * x.grad).sum(-1) / (x.norm(dim=-1) * x.grad.norm(dim=-1)).clamp_min(1e-300) for x in leaves]
    return torch.cat([c.flatten() for c in cosines]).detach()


@pytest.mark.parametrize("model_type", QK_FAMILIES)
def test_relp_keeps_scores_scale_invariant_in_query_key_norm_inputs(model_type):
    # a negligible epsilon: with it the norm, and so the scores, are exactly scale invariant
    model = tiny_model(model_type, rms_norm_eps=1e-30, layer_norm_eps=1e-30)
    sums = euler_sums(model, "relp")
    float32 = any(norm.float32 for norm in FAMILY_TABLE[model_type].norms)  # the norm computes in float32
    assert sums.abs().max() < (1e-5 if float32 else 1e-10)
    # the LN-rule on the same norms (the rule before): the scores become linear in their input
    norm = type(model.get_submodule(sorted(gradient_paths(model))[0]))
    offset = 1.0 if model_type.startswith("gemma") else 0.0
    if model_type == "stablelm":  # a LayerNorm per head inside each query/key norm
        ln = LayerNormRule(centered=True)
        forced = RuleSet("ln-on-qk", name_map={"*q_layernorm.norms.*": ln, "*k_layernorm.norms.*": ln})
    else:
        ln = LayerNormRule(centered=norm.__name__ == "LayerNorm", weight_offset=offset)
        forced = RuleSet("ln-on-qk", name_map={"*q_*norm": ln, "*k_*norm": ln})
    assert euler_sums(model, forced).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", QK_FAMILIES)
def test_block_norms_keep_the_ln_rule(model_type):
    model = tiny_model(model_type)
    plain = gradient_paths(model)
    ruled = {path for path, module in model.named_modules()
             if isinstance(RuleSet().rule_for(module, path, plain), LayerNormRule)}
    assert ruled and not ruled & plain
    assert all(RuleSet().rule_for(model.get_submodule(p), p, plain) is None for p in plain)
    assert RuleSet().uncovered(model) == []
