"""LayerActivationPatching against hand-patched forward passes."""
import pytest
import torch
from tests.conftest import build_model, model_state, token_pair

from captum_relp import LayerActivationPatching, logit_diff, model_components


def _hand_patch(model, layer, use_input, clean, corrupt, metric, location, num_heads=None, mask=None):
    """metric(clean) - metric(clean with layer[location] <- corrupt), by explicit hooks."""
    store = {}

    def read_in(m, a, kw):
        store["act"] = (a[0] if a else kw["hidden_states"]).clone()

    def read_out(m, a, o):
        store["act"] = (o[0] if isinstance(o, tuple) else o).clone()

    def region(t):
        if location is None:
            return (slice(None),)
        if num_heads is None:
            return (slice(None), location)
        position, head = location
        width = t.shape[-1] // num_heads
        return (slice(None), position, slice(head * width, (head + 1) * width))

    def write(t):
        t = t.clone()
        t[region(t)] = store["act"][region(t)]
        return t

    def write_in(m, a, kw):
        if a:
            return (write(a[0]), *a[1:]), kw
        return a, {**kw, "hidden_states": write(kw["hidden_states"])}

    def write_out(m, a, o):
        return (write(o[0]), *o[1:]) if isinstance(o, tuple) else write(o)

    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        handle = (layer.register_forward_pre_hook(read_in, with_kwargs=True) if use_input
                  else layer.register_forward_hook(read_out))
        model(corrupt, **kwargs)
        handle.remove()
        handle = (layer.register_forward_pre_hook(write_in, with_kwargs=True) if use_input
                  else layer.register_forward_hook(write_out))
        patched = metric(model(clean, **kwargs).logits)
        handle.remove()
        return metric(model(clean, **kwargs).logits) - patched


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_position_patching_matches_hand_patched_forward(family, reuse_prefix):
    model = build_model(family)
    clean, corrupt = token_pair()
    metric = logit_diff([1, 2, 3], [4, 5, 6])
    layers, flags, _ = model_components(model).select()
    before = model_state(model)
    effects = LayerActivationPatching(model, layers).attribute(
        clean, baselines=corrupt, metric=metric, attribute_to_layer_input=flags,
        internal_batch_size=4, reuse_prefix=reuse_prefix)
    assert model_state(model) == before
    for index in (0, 3, 5):
        for position in (1, clean.shape[1] - 1):
            expected = _hand_patch(model, layers[index], flags[index], clean, corrupt, metric, position)
            torch.testing.assert_close(effects[index][:, position], expected, rtol=1e-4, atol=1e-5)


def test_layer_and_head_granularity_match_hand_patching():
    model = build_model("llama")
    clean, corrupt = token_pair()
    metric = logit_diff([1, 2, 3], [4, 5, 6])
    parts = model_components(model)
    whole = LayerActivationPatching(model, parts.mlp[0]).attribute(
        clean, baselines=corrupt, metric=metric, granularity="layer")
    torch.testing.assert_close(
        whole, _hand_patch(model, parts.mlp[0], False, clean, corrupt, metric, None), rtol=1e-4, atol=1e-5)
    heads = LayerActivationPatching(model, parts.attn[1]).attribute(
        clean, baselines=corrupt, metric=metric, granularity="head", num_heads=parts.num_heads,
        attribute_to_layer_input=True)
    assert heads.shape == (3, clean.shape[1], parts.num_heads)
    expected = _hand_patch(model, parts.attn[1], True, clean, corrupt, metric, (clean.shape[1] - 1, 2),
                           num_heads=parts.num_heads)
    torch.testing.assert_close(heads[:, -1, 2], expected, rtol=1e-4, atol=1e-5)


def test_target_and_padding():
    model = build_model("gpt2")
    clean, corrupt = token_pair(batch=2, seq=6)
    mask = torch.ones_like(clean)
    mask[1, 4:] = 0
    layer = model_components(model).mlp[0]
    effects = LayerActivationPatching(model, layer).attribute(
        clean, baselines=corrupt, target=[7, 9], additional_forward_args=(mask,))
    assert torch.all(effects[1, 4:] == 0)
    tiled = LayerActivationPatching(model, layer).attribute(
        clean, baselines=corrupt, target=[7, 9], additional_forward_args=(mask,), reuse_prefix=False)
    torch.testing.assert_close(effects[:, :4], tiled[:, :4], rtol=1e-4, atol=1e-5)

    def metric(logits):  # logit of token 7/9 at each row's last real position
        return torch.stack([logits[0, 5, 7], logits[1, 3, 9]])

    expected = _hand_patch(model, layer, False, clean, corrupt, metric, 2, mask=mask)
    torch.testing.assert_close(effects[:, 2], expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    ap = LayerActivationPatching(model, model_components(model).mlp[0])
    with pytest.raises(ValueError, match="granularity"):
        ap.attribute(clean, baselines=corrupt, target=1, granularity="neuron")
    with pytest.raises(ValueError, match="num_heads"):
        ap.attribute(clean, baselines=corrupt, target=1, granularity="head")
    with pytest.raises(ValueError, match="baselines"):
        ap.attribute(clean, baselines=corrupt[:, :3], target=1)
