"""Every family of the table on a tiny config: forward unchanged under the rules, conservation,
activation patching equal to hook-based patching (with and without padding), exact edges."""
import pytest
import torch

from captum_relp import LayerActivationPatching, LayerRelevancePatching, apply_rules, model_components
from captum_relp.edges import build_graph, graph_forward
from captum_relp.families import FAMILY_TABLE
from tests.conftest import model_state
from tests.families.configs import TINY, tiny_model, token_pair
from tests.families.edge_oracles import float64_norms
from tests.families.oracles import patching_effects, target_logits

FAMILIES = sorted(FAMILY_TABLE)
TARGET = 5


def test_every_family_has_a_tiny_config():
    assert sorted(TINY) == FAMILIES


@pytest.mark.parametrize("model_type", FAMILIES)
def test_forward_bit_identical_under_the_rules(model_type):
    model = tiny_model(model_type, dtype=torch.float32)
    clean, corrupt, mask = token_pair()
    with torch.no_grad():
        reference = model(clean, attention_mask=mask).logits
    before = model_state(model)
    for preset in ("relp", "relp-ah"):
        with torch.enable_grad(), apply_rules(model, preset):
            ruled = model(clean, attention_mask=mask).logits
        assert torch.equal(ruled, reference), preset
        assert model_state(model) == before


def conservation_error(model_type: str, rules: str = "relp-ah") -> float:
    """``|sum of relevance at the first block's input - explained logit|``, float64, zero biases."""
    model = tiny_model(model_type, zero_bias=True)
    clean, _, mask = token_pair()
    block = model_components(model).blocks[0]
    relevance = LayerRelevancePatching(model, block, rules=rules).attribute(
        clean, target=TARGET, additional_forward_args=(mask,), attribute_to_layer_input=True)
    with torch.no_grad():
        logit = target_logits(model, clean, mask, TARGET)
    return float((relevance.sum(dim=(1, 2)) - logit).abs().max())


def conservation_tolerance(model_type: str) -> float:
    """1e-10, or 1e-6 where a norm computes in float32."""
    return 1e-6 if any(norm.float32 for norm in FAMILY_TABLE[model_type].norms) else 1e-10


@pytest.mark.parametrize("model_type", FAMILIES)
def test_conservation_with_relp_ah(model_type):
    assert conservation_error(model_type) < conservation_tolerance(model_type)


def ap_error(model_type: str, padded: bool) -> float:
    """Max difference between AP (default options) and hook-based patching, float64."""
    model = tiny_model(model_type)
    clean, corrupt, mask = token_pair()
    mask = mask if padded else None
    parts = model_components(model)
    layers, flags, _ = parts.select(parts.kinds)
    ap = LayerActivationPatching(model, layers).attribute(
        clean, baselines=corrupt, target=TARGET, additional_forward_args=None if mask is None else (mask,),
        attribute_to_layer_input=flags)
    oracle = patching_effects(model, layers, flags, clean, corrupt, mask, TARGET)
    assert all(a.dtype == torch.float64 for a in ap), "AP scores must keep the model's dtype"
    return max(float((a - o).abs().max()) for a, o in zip(ap, oracle))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_activation_patching_equals_hook_patching(model_type, padded):
    assert ap_error(model_type, padded) < 1e-10


EDGE_FAMILIES = [t for t in FAMILIES if FAMILY_TABLE[t].edges is not None]


def edge_errors(model_type: str):
    """(none patched vs clean run, all patched vs corrupt run), max logit differences."""
    model = tiny_model(model_type)
    clean, corrupt, mask = token_pair()
    graph = build_graph(model)
    with torch.no_grad():
        reference = graph_forward(model, graph, corrupt, mask)
        plain = graph_forward(model, graph, clean, mask)
        patched = graph_forward(model, graph, clean, mask, patch=torch.ones_like(graph.edge_mask, dtype=torch.float64),
                                corrupt_outputs=reference.outputs)
        real = mask.bool()
        clean_logits = model(clean, attention_mask=mask).logits
        corrupt_logits = model(corrupt, attention_mask=mask).logits
    return (float((plain.logits - clean_logits)[real].abs().max()),
            float((patched.logits - corrupt_logits)[real].abs().max()))


@pytest.mark.parametrize("model_type", EDGE_FAMILIES)
def test_edges_exact(model_type):
    """1e-10 with the family's norms computing in float64; as shipped, a norm computing in float32
    rounds its input, and a sum of node outputs can round differently from the model's own sum."""
    with float64_norms(model_type):
        none_error, all_error = edge_errors(model_type)
    assert none_error < 1e-10 and all_error < 1e-10
    none_error, all_error = edge_errors(model_type)
    assert none_error < conservation_tolerance(model_type) and all_error < conservation_tolerance(model_type)


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - set(EDGE_FAMILIES)))
def test_edges_refused_outside_the_table(model_type):
    with pytest.raises(ValueError, match=model_type) as refused:
        build_graph(tiny_model(model_type))
    assert FAMILY_TABLE[model_type].no_edges and FAMILY_TABLE[model_type].no_edges in str(refused.value)
