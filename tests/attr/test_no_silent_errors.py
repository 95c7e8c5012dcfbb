"""Issue 9: every path gives a right answer or a clear error (regression tests)."""
from __future__ import annotations

import threading

import pytest
import torch
from tests.conftest import build_model, model_state, token_pair

from captum_relp import (
    LayerActivationPatching,
    LayerAttributionPatching,
    LayerIntegratedGradientsPatching,
    LayerRelevancePatching,
    UnsupportedModuleError,
    apply_rules,
    logit_diff,
    model_components,
)
from captum_relp._hooks import NestedAttributionError
from captum_relp.rules.functional import identity_ratio, ln_rule

ALL = (LayerRelevancePatching, LayerAttributionPatching, LayerIntegratedGradientsPatching, LayerActivationPatching)


def _setup(family="gpt2"):
    model = build_model(family)
    clean, corrupt = token_pair(batch=2, seq=6)
    return model, model_components(model), clean, corrupt


def test_compiled_model_attributes_the_original_module():
    model, parts, clean, corrupt = _setup()
    expected = LayerRelevancePatching(model, parts.mlp).attribute(clean, baselines=corrupt, target=3)
    compiled = torch.compile(model)
    got = LayerRelevancePatching(compiled, parts.mlp).attribute(clean, baselines=corrupt, target=3)
    for e, g in zip(expected, got):
        assert torch.equal(e, g) and e.abs().sum() > 0
    ap = LayerActivationPatching(compiled, parts.mlp[0]).attribute(clean, baselines=corrupt, target=3)
    assert torch.equal(ap, LayerActivationPatching(model, parts.mlp[0]).attribute(clean, baselines=corrupt, target=3))


def test_disconnected_layer_is_an_error_naming_it_unless_allowed():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    side = torch.nn.Linear(3, 3)
    net.add_module("side", side)

    def forward(x):
        side(x)  # runs, but the output does not reach the metric
        return net[1](net[0](x))

    relp = LayerRelevancePatching(forward, [net[0], side], model=net)
    x, base = torch.randn(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"layer\[1\] \(Linear\)"):
        relp.attribute(x, baselines=base, target=0)
    scores = relp.attribute(x, baselines=base, target=0, allow_unused=True)
    assert torch.equal(scores[1], torch.zeros_like(scores[1])) and scores[0].abs().sum() > 0


def test_concurrent_attribution_is_serialised_and_leaves_the_model_unchanged():
    """Threads alternate RelP and AtP on one model; every result equals the serial run's."""
    model, parts, clean, corrupt = _setup()
    before = model_state(model)
    methods = (LayerRelevancePatching, LayerAttributionPatching)
    serial = {cls: cls(model, parts.mlp).attribute(clean, baselines=corrupt, target=3) for cls in methods}
    assert not torch.allclose(serial[methods[0]][0], serial[methods[1]][0])
    results, errors = [], []
    start = threading.Barrier(4)

    def work(index):
        try:
            start.wait()
            for step in range(6):
                cls = methods[(index + step) % 2]
                results.append((cls, cls(model, parts.mlp).attribute(clean, baselines=corrupt, target=3)))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(cls.__name__ for cls, _ in results) == sorted([c.__name__ for c in methods] * 12)
    for cls, scores in results:
        assert all(torch.equal(a, b) for a, b in zip(scores, serial[cls])), cls.__name__
    assert model_state(model) == before


def test_nested_apply_rules_is_refused_and_model_restored():
    model, parts, clean, corrupt = _setup()
    before = model_state(model)
    with apply_rules(model, "relp"):
        with pytest.raises(RuntimeError, match="already applied"):
            with apply_rules(model, "relp"):
                pass
    assert model_state(model) == before


def test_nested_attribute_inside_a_metric_says_what_happened():
    model, parts, clean, corrupt = _setup()
    inner = LayerAttributionPatching(model, parts.mlp[0])

    def metric(logits):
        inner.attribute(clean, baselines=corrupt, target=1)
        return logits[:, -1, 1]

    before = model_state(model)
    with pytest.raises(NestedAttributionError, match="already being attributed"):
        LayerRelevancePatching(model, parts.mlp[1]).attribute(clean, baselines=corrupt, metric=metric)
    assert model_state(model) == before


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad, match", [
    (lambda out: (out[:, -1, 1] - out[:, -1, 2]).mean(), r"returned shape \(\)"),
    (lambda out: out[:, :, 1], r"returned shape \(2, 6\)"),
    (lambda out: out[:, -1, 1] * float("nan"), "non-finite"),
])
def test_metric_output_is_checked(cls, bad, match):
    model, parts, clean, corrupt = _setup()
    kwargs = {"n_steps": 2} if cls is LayerIntegratedGradientsPatching else {}
    with pytest.raises(ValueError, match=match):
        cls(model, parts.mlp[0]).attribute(clean, baselines=corrupt, metric=bad, **kwargs)


@pytest.mark.parametrize("target, match", [(-1, "out of range"), (150, "out of range"), ([1, 2, 3], "entries")])
def test_ig_validates_targets_like_the_others(target, match):
    model, parts, clean, corrupt = _setup()
    for cls in (LayerIntegratedGradientsPatching, LayerRelevancePatching):
        with pytest.raises(ValueError, match=match):
            cls(model, parts.mlp[0]).attribute(clean, baselines=corrupt, target=target)


class Swish(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class ScaledNormalization(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x / x.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("module, name", [(Swish(), "Swish"), (ScaledNormalization(), "ScaledNormalization")])
def test_strict_mode_flags_unknown_computing_modules(module, name):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), module, torch.nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match=name):
        LayerRelevancePatching(net, net[0]).attribute(torch.randn(1, 4), baselines=torch.zeros(1, 4), target=0)


def test_bound_forward_with_model_gets_the_mask_as_keyword():
    model, parts, clean, corrupt = _setup()
    mask = torch.ones_like(clean)
    mask[0, -2:] = 0
    direct = LayerRelevancePatching(model, parts.mlp).attribute(
        clean, baselines=corrupt, target=3, additional_forward_args=(mask,))
    bound = LayerRelevancePatching(model.forward, parts.mlp, model=model).attribute(
        clean, baselines=corrupt, target=3, additional_forward_args=(mask,))
    assert all(torch.equal(a, b) for a, b in zip(direct, bound))


def test_logit_diff_reads_the_last_real_token_under_right_padding():
    model, parts, clean, corrupt = _setup()
    mask = torch.ones_like(clean)
    mask[0, -2:] = 0
    last = torch.tensor([3, 5])
    kwargs = dict(baselines=corrupt, additional_forward_args=(mask,))
    implicit = LayerRelevancePatching(model, parts.mlp[0]).attribute(clean, metric=logit_diff(1, 2), **kwargs)
    explicit = LayerRelevancePatching(model, parts.mlp[0]).attribute(clean, metric=logit_diff(1, 2, last), **kwargs)
    assert torch.equal(implicit, explicit)
    ap = LayerActivationPatching(model, parts.mlp[0])
    assert torch.equal(ap.attribute(clean, metric=logit_diff(1, 2), **kwargs),
                       ap.attribute(clean, metric=logit_diff(1, 2, last), **kwargs))


def test_rules_compute_float64_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64)
    norm = torch.nn.functional.layer_norm
    grad_out = torch.randn(3, 8, dtype=torch.float64)
    ln_rule(lambda t: norm(t, (8,), weight, None, 1e-5), x, weight, 1e-5).backward(grad_out)
    gw = grad_out * weight
    expected = (gw - gw.mean(-1, keepdim=True)) / torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert x.grad.dtype == torch.float64
    assert (x.grad - expected).abs().max() < 1e-13
    ratio = identity_ratio(x.detach(), torch.tanh(x.detach()), 1.0)
    assert ratio.dtype == torch.float64
    assert ((ratio * x.detach() - torch.tanh(x.detach())).abs().max()) < 1e-15


def test_small_input_errors():
    model, parts, clean, corrupt = _setup()
    with pytest.raises(ValueError, match="empty batch"):
        LayerRelevancePatching(model, parts.mlp[0]).attribute(clean[:0], baselines=corrupt[:0], target=1)
    unused = torch.nn.Linear(2, 2)
    model.add_module("unused", unused)
    with pytest.raises(ValueError, match=r"layer\[0\] \(Linear\) was not called"):
        LayerActivationPatching(model, unused).attribute(clean, baselines=corrupt, target=1)
    del model.unused
    with pytest.raises(ValueError, match="does not divide"):
        LayerActivationPatching(model, parts.attn[0]).attribute(
            clean, baselines=corrupt, target=1, granularity="head", num_heads=5, attribute_to_layer_input=True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        LayerRelevancePatching(model, parts.mlp[0]).attribute(clean, baselines=corrupt, target=1)


def test_coefficients_never_fill_zeros_silently():
    from captum_relp._coefficients import TensorSites, layer_coefficients
    from captum_relp.metrics import MetricEvaluator

    x, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    sites = TensorSites(lambda output: [x, unused], ["node group a", "node group b"].__getitem__)
    with pytest.raises(ValueError, match="does not depend on node group b"):
        with layer_coefficients(lambda: 2 * x, sites, MetricEvaluator(3)):
            pass
    with layer_coefficients(lambda: 2 * x, sites, MetricEvaluator(3), allow_unused=True) as result:
        pass
    assert torch.equal(result.coefficients[0], torch.full((3,), 2.0))
    assert torch.equal(result.coefficients[1], torch.zeros(3)) and result.unused == [1]


@pytest.mark.parametrize("cls", ["LayerRelevancePatching", "LayerAttributionPatching",
                                 "LayerIntegratedGradientsPatching", "LayerActivationPatching"])
def test_token_ids_outside_the_vocabulary_are_named(cls):
    import captum_relp

    model = build_model("llama")
    clean, corrupt = token_pair()
    corrupt[0, 1] = 64
    method = getattr(captum_relp, cls)(model, model.model.layers[0].mlp)
    with pytest.raises(ValueError, match=r"token ids \[64\] are outside the vocabulary of LlamaForCausalLM "
                                         r"\(size 64\): ids must be in \[0, 63\]"):
        method.attribute(clean, baselines=corrupt, target=1)
    with pytest.raises(ValueError, match=r"token ids \[-3\] are outside"):
        method.attribute(torch.full_like(clean, -3), baselines=corrupt, target=1)
