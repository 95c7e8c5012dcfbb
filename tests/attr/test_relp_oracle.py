"""LayerRelevancePatching against an independent RelP (tests/oracles/relp_reference.py), element by
element: every position, unit and head of resid, attn and mlp, with a padded row, float64, on
every family of the table: LayerNorm and plain MLPs (gpt2, gpt_bigcode, gpt_neo, gpt_neox, gptj,
codegen, opt, phi, falcon, bloom and mpt with ALiBi, starcoder2, the encoder bert; olmo's float32
LayerNorm without weights), RMSNorm or LayerNorm with gated MLPs (llama, mistral, qwen2, qwen3,
gemma, gemma2, gemma3_text, olmo2, phi3, stablelm, the encoder modernbert), with sliding windows,
query/key norms, offset norms, fused projections and soft-capping where the family has them."""
import pytest
import torch

from captum_relp import (
    LayerAttributionPatching,
    LayerRelevancePatching,
    logit_diff,
    model_components,
)
from captum_relp.families import FAMILY_TABLE
from tests.families.configs import tiny_model, token_pair
from tests.oracles.relp_reference import FORWARDS, relp_scores

CORRECT, WRONG = [5, 7], [9, 4]
KINDS = ("resid", "heads", "attn", "mlp")
FAMILIES = sorted(FORWARDS)


def reference_model(model_type: str):
    """A tiny float64 model with random norm weights, (where it has them) random biases, and
    weights large enough that attention patterns are far from uniform."""
    model = tiny_model(model_type, initializer_range=0.3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


def library_scores(model, clean, corrupt, mask, preset):
    """``{(kind, layer): scores}`` from one ``LayerRelevancePatching`` call over every component
    the model has (OPT has no MLP module: its MLP runs on flattened rows)."""
    parts = model_components(model)
    n = len(parts.blocks)
    groups = [("resid", parts.blocks, True), ("heads", parts.attn, True), ("attn", parts.attn, False),
              ("mlp", parts.mlp, False)]
    groups = [(kind, modules, flag) for kind, modules, flag in groups if kind.replace("heads", "attn") in parts.kinds]
    layers = [module for _, modules, _ in groups for module in modules]
    flags = [flag for _, modules, flag in groups for _ in modules]
    keys = [(kind, i) for kind, _, _ in groups for i in range(n)]
    method = LayerAttributionPatching(model, layers) if preset == "atp" else \
        LayerRelevancePatching(model, layers, rules=preset)
    scores = method.attribute(clean, baselines=corrupt, metric=logit_diff(CORRECT, WRONG),
                              additional_forward_args=(mask,), attribute_to_layer_input=flags)
    return dict(zip(keys, scores, strict=True)), parts.num_heads


def differences(model_type: str, preset: str, oracle_preset=None):
    """``{(kind, layer): max |library - oracle|}`` and the largest oracle magnitude."""
    model = reference_model(model_type)
    clean, corrupt, mask = token_pair()
    assert mask[1].sum() < mask.shape[1], "row 1 must be padded"
    want, logits = relp_scores(model, clean, corrupt, mask, CORRECT, WRONG, oracle_preset or preset)
    with torch.no_grad():
        real = mask.bool()
        assert float((model(clean, attention_mask=mask).logits - logits)[real].abs().max()) < 1e-10
    got, heads = library_scores(model, clean, corrupt, mask, "atp" if oracle_preset else preset)
    want = {key: value for key, value in want.items() if key in got}
    assert sorted(got) == sorted(want) and len(got) >= 6
    diff = {}
    for key in want:
        assert got[key].dtype == torch.float64 and got[key].shape == want[key].shape, key
        diff[key] = float((got[key] - want[key]).abs().max())
        if key[0] == "heads" and not oracle_preset:  # the head layout: per-head sums of the projection's input
            per_head = LayerRelevancePatching(model, model_components(model).attn[key[1]], rules=preset).attribute(
                clean, baselines=corrupt, metric=logit_diff(CORRECT, WRONG), additional_forward_args=(mask,),
                attribute_to_layer_input=True, reduce="heads", num_heads=heads)
            expected = want[key].reshape(*want[key].shape[:2], heads, -1).sum(-1)
            diff["per-head", key[1]] = float((per_head - expected).abs().max())
    scale = max(float(w.abs().max()) for w in want.values())
    return diff, scale, want


FLOAT32_QK = {"modernbert": 1e-7}
"""Relative tolerances (of the largest score) where the model rounds queries and keys to float32
(ModernBERT's rotary): their gradients carry float32 rounding, which sdpa's backward and the
reference's round differently (measured 6e-9 of 3); the AH-rule, which stops them, is held to 1e-10."""


def tolerance(model_type: str, preset: str, scale: float) -> float:
    return 1e-10 if preset == "relp-ah" else FLOAT32_QK.get(model_type, 1e-10 / scale) * scale


CASES = [pytest.param(model_type, preset) for model_type in FAMILIES for preset in ("relp", "relp-ah")]


def test_the_reference_covers_every_family_of_the_table():
    assert FAMILIES == sorted(FAMILY_TABLE)


@pytest.mark.parametrize("model_type, preset", CASES)
def test_relp_equals_the_independent_reference(model_type, preset):
    diff, scale, want = differences(model_type, preset)
    assert scale > 1e-3, "the scores must not be trivially small"
    assert all(float(w[1].abs().sum()) > 0 for key, w in want.items() if key[0] != "resid" or key[1] > 0)
    limit = tolerance(model_type, preset, scale)
    bad = {key: d for key, d in diff.items() if not d < limit}
    assert not bad, f"{model_type} {preset}: max |library - reference| beyond {limit:.2g}: {bad}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_reference_without_rules_equals_attribution_patching(model_type):
    """The reference's forward and gradients, checked by autograd through the model itself."""
    diff, scale, _ = differences(model_type, "none", oracle_preset="none")
    assert max(diff.values()) < tolerance(model_type, "none", scale), diff


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_presets_differ_from_each_other_in_the_reference(model_type):
    """Each rule moves the reference's scores, so agreement is not reached by chance."""
    model = reference_model(model_type)
    clean, corrupt, mask = token_pair()
    runs = {preset: relp_scores(model, clean, corrupt, mask, CORRECT, WRONG, preset)[0]
            for preset in ("none", "relp", "relp-ah")}
    for a, b in (("none", "relp"), ("relp", "relp-ah")):
        moved = max(float((runs[a][key] - runs[b][key]).abs().max()) for key in runs[a])
        assert moved > 1e-4, (a, b, moved)
