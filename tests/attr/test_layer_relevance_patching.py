"""LayerRelevancePatching: equality with AtP/AP where theory says so, conservation, passes, errors."""
import pytest
import torch
from tests.conftest import VOCAB, build_model, model_state, token_pair

from captum_relp import (
    LayerActivationPatching,
    LayerAttributionPatching,
    LayerRelevancePatching,
    logit_diff,
    model_components,
    split_heads,
)


def _metric(batch):
    return logit_diff(list(range(1, batch + 1)), list(range(10, 10 + batch)))


def _manual_atp(model, layers, flags, clean, corrupt, metric):
    """Gradient x activation difference, computed directly with hooks and autograd."""
    acts = {}

    def grab(i, key):
        def out_hook(m, a, o):
            acts[(key, i)] = o[0] if isinstance(o, tuple) else o

        def in_hook(m, a, kw):
            acts[(key, i)] = a[0] if a else kw["hidden_states"]

        return in_hook, out_hook

    def run(ids, key):
        handles = []
        for i, (layer, flag) in enumerate(zip(layers, flags)):
            in_hook, out_hook = grab(i, key)
            handles.append(layer.register_forward_pre_hook(in_hook, with_kwargs=True) if flag
                           else layer.register_forward_hook(out_hook))
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(key == "clean")
        value = metric(model(inputs_embeds=embeds).logits).sum()
        for h in handles:
            h.remove()
        return value

    with torch.no_grad():
        run(corrupt, "corrupt")
    value = run(clean, "clean")
    grads = torch.autograd.grad(value, [acts[("clean", i)] for i in range(len(layers))])
    return [(acts[("clean", i)] - acts[("corrupt", i)]) * g for i, g in enumerate(grads)]


def test_atp_equals_direct_gradient_times_difference():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    metric = _metric(clean.shape[0])
    expected = _manual_atp(model, layers, flags, clean, corrupt, metric)
    atp = LayerAttributionPatching(model, layers).attribute(
        clean, baselines=corrupt, metric=metric, attribute_to_layer_input=flags)
    for got, want in zip(atp, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_relp_without_rules_equals_atp_and_with_rules_differs(family):
    model = build_model(family)
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    metric = _metric(clean.shape[0])
    kwargs = dict(baselines=corrupt, metric=metric, attribute_to_layer_input=flags)
    atp = LayerAttributionPatching(model, layers).attribute(clean, **kwargs)
    none = LayerRelevancePatching(model, layers, rules="none").attribute(clean, **kwargs)
    relp = LayerRelevancePatching(model, layers, rules="relp").attribute(clean, **kwargs)
    ah = LayerRelevancePatching(model, layers, rules="relp-ah").attribute(clean, **kwargs)
    for a, n in zip(atp, none):
        assert torch.equal(a, n)
    assert any(not torch.allclose(a, r) for a, r in zip(atp, relp))
    assert any(not torch.allclose(r, h) for r, h in zip(relp, ah))
    assert all(torch.isfinite(r).all() for r in relp + ah)


class _LinearToy(torch.nn.Module):
    """An exactly linear sequence model: AtP must equal activation patching."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(3, 5)
        self.second = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        hidden = self.second(self.first(x))
        return self.head(hidden.cumsum(dim=1))  # positions mix linearly, like attention with fixed weights


def test_atp_equals_activation_patching_on_linear_model():
    torch.manual_seed(0)
    toy = _LinearToy()
    clean, corrupt = torch.randn(2, 4, 3), torch.randn(2, 4, 3)

    def metric(out):
        return out[:, -1, 0] - out[:, -1, 1]

    layers = [toy.first, toy.second]
    atp = LayerAttributionPatching(toy, layers).attribute(clean, baselines=corrupt, metric=metric)
    ap = LayerActivationPatching(toy, layers).attribute(clean, baselines=corrupt, metric=metric)
    for a, p in zip(atp, ap):
        torch.testing.assert_close(a.sum(-1), p, rtol=1e-5, atol=1e-5)


class _RuledToy(torch.nn.Module):
    """Every nonlinearity has a rule and no layer has a bias: LRP conserves relevance."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8, bias=False)
        self.up = torch.nn.Linear(8, 12, bias=False)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(12, 8, bias=False)
        self.gated = _Gated()
        self.out = torch.nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = self.norm(self.embed(x))
        h = self.down(self.act(self.up(h)))
        return self.out(self.gated(h))


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(8, 10, bias=False)
        self.up_proj = torch.nn.Linear(8, 10, bias=False)
        self.down_proj = torch.nn.Linear(10, 8, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_lrp_conservation_on_toy_network():
    from captum_relp import register_rule, unregister_rule
    from captum_relp.rules import HalfRule

    torch.manual_seed(0)
    toy = _RuledToy()
    x = torch.randn(4, 6)
    layers = [toy.embed, toy.norm, toy.up, toy.act, toy.down, toy.gated.up_proj, toy.gated]
    with torch.no_grad():
        metric_value = toy(x)[:, 1]
    register_rule(_Gated, HalfRule())
    try:
        relevance = LayerRelevancePatching(toy, layers).attribute(x, target=1)
        plain = LayerRelevancePatching(toy, layers, rules="none").attribute(x, target=1)
    finally:
        unregister_rule(_Gated)
    *conserving, up_branch, gated = relevance
    for layer_relevance in conserving + [gated]:
        torch.testing.assert_close(layer_relevance.sum(-1), metric_value, rtol=1e-4, atol=1e-5)
    # Half-rule: the up branch of the gate receives exactly half of the relevance
    torch.testing.assert_close(up_branch.sum(-1), 0.5 * metric_value, rtol=1e-4, atol=1e-5)
    # plain gradient x activation does not conserve through LayerNorm / GELU / gates
    assert not torch.allclose(plain[0].sum(-1), metric_value, rtol=1e-2)


def test_one_clean_one_corrupt_forward_and_one_backward_for_all_layers():
    model = build_model("llama")
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    calls = {"forward": 0, "backward": 0}

    def count(key):
        def hook(*args):
            calls[key] += 1

        return hook

    handles = [model.register_forward_pre_hook(count("forward")),
               model.lm_head.register_full_backward_hook(count("backward"))]
    LayerRelevancePatching(model, layers).attribute(
        clean, baselines=corrupt, metric=_metric(3), attribute_to_layer_input=flags)
    for handle in handles:
        handle.remove()
    assert calls == {"forward": 2, "backward": 1}


def test_padding_gives_zero_at_pads_and_same_scores_as_unpadded():
    model = build_model("gpt2")
    clean, corrupt = token_pair(batch=2, seq=7)
    short_clean, short_corrupt = clean[:1, :5], corrupt[:1, :5]
    padded_clean, padded_corrupt = clean.clone(), corrupt.clone()
    padded_clean[0, 5:] = padded_corrupt[0, 5:] = 0
    mask = torch.ones_like(clean)
    mask[0, 5:] = 0
    layers, flags, _ = model_components(model).select()
    relp = LayerRelevancePatching(model, layers)
    batch = relp.attribute(padded_clean, baselines=padded_corrupt, target=[3, 4],
                           additional_forward_args=(mask,), attribute_to_layer_input=flags)
    alone = relp.attribute(short_clean, baselines=short_corrupt, target=3, attribute_to_layer_input=flags)
    for b, a in zip(batch, alone):
        assert torch.all(b[0, 5:] == 0)
        torch.testing.assert_close(b[0, :5], a[0], rtol=1e-4, atol=1e-5)


def test_denoising_direction_uses_coefficients_of_the_baseline_run():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    layer = model_components(model).mlp[1]
    relp = LayerRelevancePatching(model, layer)
    noising = relp.attribute(clean, baselines=corrupt, target=5)
    denoising = relp.attribute(clean, baselines=corrupt, target=5, direction="denoising")
    coef_corrupt = LayerRelevancePatching(model, layer, multiply_by_inputs=False).attribute(corrupt, target=5)
    acts = LayerActivationPatching(model, layer)._corrupt_activations  # Captum LayerActivation
    clean_act, corrupt_act = acts((clean,), [False], (), {})[0], acts((corrupt,), [False], (), {})[0]
    torch.testing.assert_close(denoising, (clean_act - corrupt_act) * coef_corrupt)
    assert not torch.allclose(noising, denoising)


def test_per_head_scores_sum_to_attention_output_score():
    model = build_model("llama")
    clean, corrupt = token_pair()
    parts = model_components(model)
    o_proj = parts.attn[1]
    relp = LayerRelevancePatching(model, [o_proj, o_proj])
    heads_in, out = relp.attribute(clean, baselines=corrupt, metric=_metric(3),
                                   attribute_to_layer_input=[True, False])
    per_head = split_heads(heads_in, parts.num_heads)
    assert per_head.shape == (3, clean.shape[1], parts.num_heads)
    torch.testing.assert_close(per_head.sum(-1), out.sum(-1), rtol=1e-4, atol=1e-5)


def test_bfloat16_model_runs_and_tracks_float32():
    """bf16 RelP is near float32 RelP and far from float32 AtP (element by element): rules dropped in
    bf16 would give AtP, which correlates with RelP at 0.96 but differs from it by 28%."""
    model = build_model("qwen2")
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    kwargs = dict(baselines=corrupt, metric=_metric(3), attribute_to_layer_input=flags)
    relp = torch.cat([r.flatten() for r in LayerRelevancePatching(model, layers).attribute(clean, **kwargs)])
    atp = torch.cat([a.flatten() for a in LayerAttributionPatching(model, layers).attribute(clean, **kwargs)])
    half = LayerRelevancePatching(model.to(torch.bfloat16), layers).attribute(clean, **kwargs)
    assert all(h.dtype == torch.bfloat16 for h in half)
    got = torch.cat([h.float().flatten() for h in half])
    error, atp_gap = float((got - relp).norm()), float((got - atp).norm())
    assert error < 0.03 * float(relp.norm())  # measured 0.0095; the Half-rule alone dropped: 0.06
    assert error < 0.2 * atp_gap  # measured 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    kwargs = dict(metric=_metric(3), attribute_to_layer_input=flags)
    cpu = LayerRelevancePatching(model, layers).attribute(clean, baselines=corrupt, **kwargs)
    model.cuda()
    gpu = LayerRelevancePatching(model, layers).attribute(clean.cuda(), baselines=corrupt.cuda(), **kwargs)
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-4)


def test_additional_forward_args_for_plain_callables():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))

    def forward(x, scale):
        return net(x) * scale

    relp = LayerRelevancePatching(forward, net[1], model=net)
    x = torch.randn(2, 3)
    once = relp.attribute(x, target=0, additional_forward_args=(1.0,))
    twice = relp.attribute(x, target=0, additional_forward_args=(2.0,))
    torch.testing.assert_close(twice, 2 * once)
    with pytest.raises(ValueError, match="model="):
        LayerRelevancePatching(forward, net[1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r, c, k: r.attribute(c, baselines=k[:, :4], target=1), "baselines"),
        (lambda r, c, k: r.attribute(c, baselines=k, target=VOCAB + 5), "target"),
        (lambda r, c, k: r.attribute(c, baselines=k, target=1, metric=lambda o: o[:, -1, 0]), "target or metric"),
        (lambda r, c, k: r.attribute(c, baselines=k, target=1, direction="sideways"), "direction"),
        (lambda r, c, k: r.attribute(c, baselines=k, metric=lambda o: 1 / 0), "division"),
    ],
)
def test_bad_input_raises_clear_error_and_leaves_model_untouched(call, message):
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    before = model_state(model)
    relp = LayerRelevancePatching(model, model_components(model).mlp, rules="relp-ah")
    with pytest.raises(Exception, match=message):
        call(relp, clean, corrupt)
    assert model_state(model) == before


def test_layer_outside_model_is_rejected():
    model = build_model("gpt2")
    with pytest.raises(ValueError, match=r"layer\[0\].*not a submodule"):
        LayerRelevancePatching(model, torch.nn.Linear(2, 2))
