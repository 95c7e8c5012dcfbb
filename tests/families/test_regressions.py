"""One regression test per case of issue 18's "Why" (each fails on the main before the family table).

The family tests (``test_families.py``) run the same oracles on every family; these pin the
cases that were silently wrong: scores under a wrong name, a changed forward, uncovered gates
and soft-caps, AP crashes and dtype, inexact edges, and misfit advice.
"""
import pytest
import torch

from captum_relp import LayerActivationPatching, LayerRelevancePatching, RuleSet, apply_rules, model_components
from captum_relp.edges import build_graph, graph_forward
from captum_relp.rules import check_coverage
from captum_relp.rules.registry import needs_rule
from captum_relp.rules.nonlinear import FusedGateRule
from tests.families.configs import tiny_model, token_pair
from tests.families.test_families import ap_error, conservation_error, conservation_tolerance


def _relevance(model, rules):
    clean, _, mask = token_pair()
    block = model_components(model).blocks[0]
    return LayerRelevancePatching(model, block, rules=rules).attribute(
        clean, target=5, additional_forward_args=(mask,), attribute_to_layer_input=True)


@pytest.mark.parametrize("model_type", ["gpt_neo", "mpt", "bloom"])
def test_relp_ah_is_applied_where_attention_is_computed_in_own_code(model_type):
    model = tiny_model(model_type, zero_bias=True)
    assert not torch.allclose(_relevance(model, "relp-ah"), _relevance(model, "relp"))
    assert conservation_error(model_type) < 1e-10


def test_relp_ah_on_falcon_keeps_the_forward_and_the_causal_mask():
    model = tiny_model("falcon", dtype=torch.float32)
    clean, _, _ = token_pair()
    changed = clean.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 32
    with torch.no_grad():
        reference = model(clean).logits
    with torch.enable_grad(), apply_rules(model, "relp-ah"):
        ruled, moved = model(clean).logits, model(changed).logits
    assert torch.equal(ruled, reference)
    assert torch.equal(moved[:, 0], ruled[:, 0])  # the last token cannot reach position 0
    assert conservation_error("falcon") < 1e-10


@pytest.mark.parametrize("model_type, layout", [("modernbert", "wi"), ("phi3", "gate_up_proj")])
def test_fused_gated_mlps_get_the_half_rule(model_type, layout):
    model = tiny_model(model_type)
    mlp = model_components(model).mlp[0]
    rule = RuleSet().rule_for(mlp)
    assert isinstance(rule, FusedGateRule) and rule.layout == layout
    assert needs_rule(mlp)  # an unregistered fused gate is flagged, never silently left to the gradient
    assert conservation_error(model_type) < conservation_tolerance(model_type)


def test_gemma2_final_logit_softcap_conserves():
    model = tiny_model("gemma2")
    assert model.config.final_logit_softcapping and model.config.attn_logit_softcapping
    assert conservation_error("gemma2") < 1e-6
    assert conservation_error("gemma2", rules="relp") > 1e-6  # attention softcap: plain gradient under relp


@pytest.mark.parametrize("model_type", ["gpt_bigcode", "bloom", "falcon"])
def test_activation_patching_default_options_match_hooks(model_type):
    assert ap_error(model_type, padded=False) < 1e-10


def test_activation_patching_keeps_float64():
    model = tiny_model("gpt2")
    clean, corrupt, _ = token_pair()
    scores = LayerActivationPatching(model, model_components(model).mlp[0]).attribute(
        clean, baselines=corrupt, target=5)
    assert scores.dtype == torch.float64


def test_falcon_relp_on_mlp_outputs_that_blocks_add_to_in_place():
    model = tiny_model("falcon")
    clean, corrupt, _ = token_pair()
    mlp = model_components(model).mlp[0]
    seen = {}
    handle = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("act", o.clone()) is None or None)
    with torch.no_grad():
        model(clean)
    handle.remove()
    relevance = LayerRelevancePatching(model, mlp, multiply_by_inputs=False).attribute(clean, target=5)
    plain = LayerRelevancePatching(model, mlp).attribute(clean, target=5)
    torch.testing.assert_close(plain, seen["act"] * relevance, rtol=0, atol=1e-12)


def test_edges_exact_with_a_sliding_window_shorter_than_the_prompt():
    model = tiny_model("mistral")
    clean, _, mask = token_pair(seq=9)
    assert model.config.sliding_window < clean.shape[1]
    with torch.no_grad():
        run = graph_forward(model, build_graph(model), clean, mask)
        reference = model(clean, attention_mask=mask).logits
    assert float((run.logits - reference)[mask.bool()].abs().max()) < 1e-10


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = type("ScaledTokenEmbedding", (torch.nn.Embedding,), {"__module__": "my.model"})(8, 4)
        self.patches = type("PatchConv", (torch.nn.Conv2d,), {"__module__": "my.model"})(1, 4, 2)
        self.norm = type("MyNorm", (torch.nn.Module,), {"__module__": "my.model", "forward": lambda s, x: x})()


def test_strict_mode_advice_fits_the_module():
    with pytest.raises(TypeError) as error:
        check_coverage(_Encoder(), RuleSet())
    message = str(error.value)
    for kind in ("ScaledTokenEmbedding", "PatchConv"):
        advice = message.split(f"{kind}: ")[1].split(";")[0]
        assert "category='structural'" in advice and "LayerNormRule" not in advice
    assert "LayerNormRule" in message.split("MyNorm: ")[1]


def test_relp_ah_refused_rather_than_relabelled(monkeypatch):
    import dataclasses
    import warnings

    import transformers

    from captum_relp import UnsupportedModuleError
    from captum_relp.families import FAMILY_TABLE, Attention

    model = tiny_model("gpt2")  # a table entry whose AH-rule is declared impossible refuses relp-ah
    monkeypatch.setitem(FAMILY_TABLE, "gpt2", dataclasses.replace(FAMILY_TABLE["gpt2"], attn=Attention("refused")))
    with pytest.raises(UnsupportedModuleError, match="AH-rule.*'relp'"):
        _relevance(model, "relp-ah")
    _relevance(model, "relp")
    torch.manual_seed(0)  # outside the table (strict=False): attention in the model's own code refuses too
    gpt = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(32, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModuleError, match="own code"):
            LayerRelevancePatching(gpt, gpt.transformer.h[0], rules="relp-ah", strict=False).attribute(
                ids, target=3, attribute_to_layer_input=True)
        LayerRelevancePatching(gpt, gpt.transformer.h[0], strict=False).attribute(
            ids, target=3, attribute_to_layer_input=True)
