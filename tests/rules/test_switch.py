"""Several rule sets on one forward pass (``rules.switch``): the scores of every candidate equal
one ``attribute`` call per candidate, on every family of the table; forward outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from captum_relp import LayerRelevancePatching, RuleSet, model_components
from captum_relp.calibration import default_candidates, explicit_ruleset
from captum_relp.rules import AHRule, IdentityRule
from captum_relp.rules.switch import RuleSwitch, SwitchUnsupported, switch_rules
from tests.families.configs import TINY, tiny_model, token_pair

DECODERS = [t for t in TINY if t not in ("bert", "modernbert")]


def _setup(model_type):
    model = tiny_model(model_type)
    clean, corrupt, mask = token_pair()
    components = model_components(model)
    layers, flags, _ = components.select(components.kinds)
    kwargs = dict(target=5, additional_forward_args={"attention_mask": mask}, attribute_to_layer_input=flags)
    return model, layers, clean, corrupt, mask, kwargs


@pytest.mark.parametrize("model_type", DECODERS)
def test_shared_pass_equals_one_pass_per_candidate(model_type):
    model, layers, clean, corrupt, mask, kwargs = _setup(model_type)
    candidates = [explicit_ruleset(c) for c in default_candidates(model)]
    shared = LayerRelevancePatching(model, layers).attribute_rule_sets(clean, corrupt, candidates, **kwargs)
    distinct = 0
    for candidate in candidates:
        one = LayerRelevancePatching(model, layers, rules=candidate).attribute(clean, baselines=corrupt, **kwargs)
        for got, want in zip(shared[candidate.name], one):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        distinct += not all(torch.allclose(a, b) for a, b in zip(one, shared[candidates[0].name]))
    assert distinct >= len(candidates) // 2  # the candidates really differ: the switch is not a no-op


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2", "falcon"])
def test_forward_unchanged_and_model_restored(model_type):
    model, layers, clean, corrupt, mask, kwargs = _setup(model_type)
    with torch.no_grad():
        before = model(clean, attention_mask=mask).logits
    attn_before = model.config._attn_implementation
    candidates = [explicit_ruleset(c) for c in default_candidates(model)]
    with torch.enable_grad(), switch_rules(model, candidates):
        during = model(clean, attention_mask=mask).logits
    assert torch.equal(during, before)
    with torch.no_grad():
        assert torch.equal(model(clean, attention_mask=mask).logits, before)
    assert model.config._attn_implementation == attn_before
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_backward_follows_the_selected_candidate_and_ah_drops_query_key_gradient():
    model = tiny_model("llama")
    clean, _, mask = token_pair()
    attn = model.model.layers[1].self_attn
    layers = [attn.q_proj, attn.v_proj]
    scores = LayerRelevancePatching(model, layers).attribute_rule_sets(
        clean, token_pair()[1], [RuleSet("none", categories=()), RuleSet("ah", categories=(), attention=AHRule())],
        target=3, additional_forward_args={"attention_mask": mask}, allow_unused=True)
    assert scores["none"][0].abs().sum() > 0 and scores["ah"][0].abs().sum() == 0  # queries: no relevance
    assert scores["ah"][1].abs().sum() > 0  # values keep theirs


def test_refuses_what_cannot_be_switched_and_restores_the_model():
    model = tiny_model("gpt2")
    foreign = type("ForeignRule", (IdentityRule,), {"__module__": "user_code"})()
    with pytest.raises(SwitchUnsupported, match="ForeignRule"):
        with switch_rules(model, [RuleSet("a"), RuleSet("b", overrides={type(model.transformer.h[0].mlp.act):
                                                                            foreign})]):
            pass
    assert all("forward" not in m.__dict__ for m in model.modules())
    # a site inside a module with several variants would be captured once per variant
    llama = tiny_model("llama")
    down_proj = llama.model.layers[0].mlp.down_proj  # inside the MLP, which the Half-rule switches
    with pytest.raises(SwitchUnsupported, match="inside"):
        pick = [explicit_ruleset(c) for c in default_candidates(llama) if c.name in ("gradient", "half")]
        with switch_rules(llama, pick, sites=[down_proj]):
            pass
    assert all("forward" not in m.__dict__ for m in llama.modules())


def test_switch_index_checked():
    with pytest.raises(IndexError):
        RuleSwitch(["a"]).select(1)
