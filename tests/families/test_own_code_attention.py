"""The AH-rule on families that compute attention in their own code (GPT-Neo, Bloom, Falcon, MPT).

The rule detaches the query and key columns of public projections in the layout the family table
names. A wrong layout either lets gradient through the softmax or cuts the values' relevance, and
both break conservation; so every layout is checked by conservation and an unchanged forward.
"""
import pytest
import torch

from captum_relp import LayerRelevancePatching, apply_rules, model_components
from captum_relp.families import ah_module_rules
from captum_relp.rules.attention import qk_column_mask
from tests.families.configs import tiny_model, token_pair
from tests.families.oracles import target_logits

FALCON_LAYOUTS = {  # config overrides -> the layout the table must give
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    "multi-query": dict(new_decoder_architecture=False, multi_query=True, alibi=True, parallel_attn=False),
    "per-head": dict(new_decoder_architecture=False, multi_query=False, num_kv_heads=4, alibi=False,
                     parallel_attn=True),
}


def _conservation_error(model) -> float:
    clean, _, mask = token_pair()
    block = model_components(model).blocks[0]
    relevance = LayerRelevancePatching(model, block, rules="relp-ah").attribute(
        clean, target=5, additional_forward_args=(mask,), attribute_to_layer_input=True)
    with torch.no_grad():
        logit = target_logits(model, clean, mask, 5)
    return float((relevance.sum(dim=(1, 2)) - logit).abs().max())


@pytest.mark.parametrize("layout", sorted(FALCON_LAYOUTS))
def test_falcon_every_qkv_layout_conserves_and_keeps_the_forward(layout):
    overrides = FALCON_LAYOUTS[layout]
    model = tiny_model("falcon", zero_bias=True, **overrides)
    assert ah_module_rules(model)[0][1].layout == layout
    assert _conservation_error(model) < 1e-10
    clean, _, mask = token_pair()
    with torch.no_grad():
        reference = model(clean, attention_mask=mask).logits
    with torch.enable_grad(), apply_rules(model, "relp-ah"):
        assert torch.equal(model(clean, attention_mask=mask).logits, reference)


@pytest.mark.parametrize("model_type", ["gpt_neo", "bloom", "mpt", "falcon"])
def test_wrong_layout_breaks_conservation(model_type, monkeypatch):
    """The conservation oracle can fail: the same rule with the value columns detached instead."""
    model = tiny_model(model_type, zero_bias=True)
    assert _conservation_error(model) < 1e-10
    import captum_relp.rules.attention as attention

    monkeypatch.setattr(attention, "qk_column_mask",
                        lambda *args: ~qk_column_mask(*args) if args[0] != "all" else torch.zeros(args[1], dtype=bool))
    assert _conservation_error(model) > 1e-6  # 1e-4 to 1e-2 on these tiny models


def test_qk_column_mask_matches_a_hand_written_split():
    heads, kv, hd = 4, 2, 3  # columns labelled q/k/v the way the weights are stored
    grouped = (["q"] * hd * 2 + ["k"] * hd + ["v"] * hd) * kv
    per_head = (["q"] * hd + ["k"] * hd + ["v"] * hd) * heads
    multi_query = ["q"] * hd * heads + ["k"] * hd + ["v"] * hd
    for layout, labels in (("grouped", grouped), ("per-head", per_head), ("multi-query", multi_query)):
        mask = qk_column_mask(layout, len(labels), heads, kv)
        assert mask.tolist() == [label != "v" for label in labels], layout
    with pytest.raises(ValueError, match="cannot have 10 output columns"):
        qk_column_mask("per-head", 10, heads=4)


def test_a_model_with_another_attention_class_is_refused():
    model = tiny_model("bloom")
    for block in model_components(model).blocks:  # e.g. a flash-attention variant of the class
        block.self_attention.__class__ = type("BloomFlashAttention", (type(block.self_attention),), {})
    with pytest.raises(ValueError, match="BloomAttention modules, but .* has 0 of them for 2 blocks"):
        ah_module_rules(model)


def test_relp_ah_refuses_a_model_whose_attention_bypasses_the_interface(monkeypatch):
    """An 'interface' family whose attention (on some transformers release) is computed in its own
    code: the AH wrapper is never called, and relp-ah raises instead of returning relp scores."""
    from captum_relp import UnsupportedModuleError

    model = tiny_model("llama")
    attention = model_components(model).blocks[0].self_attn
    monkeypatch.setattr(type(attention), "forward", lambda self, hidden_states, *a, **k: (hidden_states * 0, None))
    clean, _, mask = token_pair()
    with pytest.raises(UnsupportedModuleError, match="not through transformers' AttentionInterface"):
        LayerRelevancePatching(model, model_components(model).blocks[0], rules="relp-ah").attribute(
            clean, target=5, additional_forward_args=(mask,), attribute_to_layer_input=True)
    assert not model._forward_hooks and not model._forward_pre_hooks  # the rule's hooks are gone
