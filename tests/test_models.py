"""model_components per family, split_heads, and the metric helpers."""
import pytest
import torch
from tests.conftest import build_model

from captum_relp import LogitDiff, ProbDiff, model_components, split_heads


@pytest.mark.parametrize("family, attn_type, mlp_type", [
    ("gpt2", "Conv1D", "GPT2MLP"), ("gpt_neox", "Linear", "GPTNeoXMLP"), ("llama", "Linear", "LlamaMLP"),
    ("qwen2", "Linear", "Qwen2MLP"), ("gemma2", "Linear", "Gemma2MLP"), ("bert", "Linear", "Linear"),
])
def test_components_per_family(family, attn_type, mlp_type):
    model = build_model(family)
    parts = model_components(model)
    assert len(parts.blocks) == len(parts.attn) == len(parts.mlp) == 2
    assert type(parts.attn[0]).__name__ == attn_type and type(parts.mlp[0]).__name__ == mlp_type
    assert parts.num_heads == 4
    layers, flags, labels = parts.select()
    assert flags == [True] * 2 + [False] * 4
    assert labels[2] == ("attn", 0)


def test_every_component_kind_is_an_attribute_of_its_name():
    model = build_model("gpt2")
    parts = model_components(model)
    assert parts.resid == parts.blocks == list(model.transformer.h)
    for kind in parts.kinds:  # the names of select(), the CLI and every results table
        layers, _, labels = parts.select([kind])
        assert getattr(parts, kind) == layers and {k for k, _ in labels} == {kind}


def test_attention_component_output_is_the_attention_module_output():
    model = build_model("gpt2")
    outputs = {}
    block = model.transformer.h[0]
    h1 = block.attn.register_forward_hook(lambda m, a, o: outputs.__setitem__("attn", o[0]))
    h2 = model_components(model).attn[0].register_forward_hook(lambda m, a, o: outputs.__setitem__("proj", o))
    with torch.no_grad():
        model(torch.randint(0, 60, (1, 5)))
    h1.remove(), h2.remove()
    assert torch.equal(outputs["attn"], outputs["proj"])


def test_unknown_component_kind():
    with pytest.raises(ValueError, match="component kind"):
        model_components(build_model("gpt2")).select(["embed"])


def test_split_heads_sums_contiguous_slices_per_head():
    """Head h is the slice [h * D, (h + 1) * D) of the last dimension (the o_proj input layout)."""
    x = torch.arange(24.0).reshape(2, 1, 12)
    assert split_heads(x, 3).tolist() == [[[6.0, 22.0, 38.0]], [[54.0, 70.0, 86.0]]]


def test_split_heads_rejects_bad_width():
    with pytest.raises(ValueError, match="num_heads"):
        split_heads(torch.ones(1, 2, 7), 2)


def test_metrics_by_hand():
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2], logits[0, 1, 3] = 5.0, 1.0
    logits[1, 2, 2], logits[1, 2, 3] = -1.0, 1.0
    diff = LogitDiff([2, 2], [3, 3], positions=[1, 2])(logits)
    torch.testing.assert_close(diff, torch.tensor([4.0, -2.0]))
    probs = ProbDiff(2, 3, positions=[1, 2])(logits)
    p0 = torch.softmax(logits[0, 1], -1)
    assert probs[0].item() == pytest.approx((p0[2] - p0[3]).item())
