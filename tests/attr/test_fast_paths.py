"""Issue 12: logits only at the metric's positions, streamed reduction, AP on the key/value cache."""
from __future__ import annotations

import pytest
import torch
import transformers
from tests.conftest import VOCAB, build_model, token_pair

from captum_relp import (
    LayerActivationPatching,
    LayerAttributionPatching,
    LayerIntegratedGradientsPatching,
    LayerRelevancePatching,
    logit_diff,
    model_components,
)
from captum_relp.metrics import MetricEvaluator
from captum_relp._forward import full_logits, metric_logits
from captum_relp.attr import _batched_patching, _prefix_cache
from captum_relp.models import split_heads

CAUSAL = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2")


def _mask(clean):
    mask = torch.ones_like(clean)
    mask[0, -2:] = 0  # right padding on the first row
    return mask


def _calls(clean, positions=(2, 5, 4)):
    return {
        "logit_diff": dict(metric=logit_diff([3, 4, 5], [6, 7, 8])),
        "positions": dict(metric=logit_diff(3, 4, positions=list(positions))),
        "target_mask": dict(target=[3, 4, 5], additional_forward_args={"attention_mask": _mask(clean)}),
    }


def _head_shapes(model):
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    return shapes, handle


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("cls", [LayerRelevancePatching, LayerAttributionPatching])
def test_sliced_logits_equal_full_logits_relp_atp(family, cls):
    model = build_model(family).double()
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    for name, kwargs in _calls(clean).items():
        shapes, handle = _head_shapes(model)
        fast = cls(model, layers).attribute(clean, baselines=corrupt, attribute_to_layer_input=flags, **kwargs)
        handle.remove()
        assert shapes and all(len(s) == 2 and s[0] <= 8 for s in shapes), (name, shapes)  # (rows, V): sliced
        with full_logits():
            ref = cls(model, layers).attribute(clean, baselines=corrupt, attribute_to_layer_input=flags, **kwargs)
        assert any(r.abs().max() > 1e-4 for r in ref)
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sliced_logits_equal_full_logits_ap_ig(family):
    model = build_model(family).double()
    clean, corrupt = token_pair()
    parts = model_components(model)
    layers, flags = [parts.blocks[1], parts.mlp[0]], [True, False]
    for name, kwargs in _calls(clean).items():
        for cls, extra in ((LayerActivationPatching, {"use_cache": False}), (LayerIntegratedGradientsPatching, {})):
            fast = cls(model, layers).attribute(clean, baselines=corrupt, attribute_to_layer_input=flags,
                                                **kwargs, **extra)
            with full_logits():
                ref = cls(model, layers).attribute(clean, baselines=corrupt, attribute_to_layer_input=flags,
                                                   **kwargs, **extra)
            assert any(r.abs().max() > 1e-6 for r in ref), (name, cls)
            for f, r in zip(fast, ref):
                torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def test_metric_reading_every_position_keeps_full_logits():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    shapes, handle = _head_shapes(model)
    LayerRelevancePatching(model, model_components(model).mlp).attribute(
        clean, baselines=corrupt, metric=lambda logits: logits[:, :, 3].sum(1))
    handle.remove()
    assert shapes == [(0, 7, VOCAB), (3, 7, VOCAB)]  # corrupt run: no logits; clean run: all


def test_metric_logits_reads_last_real_position_per_row():
    model = build_model("llama")
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    full = model(ids, attention_mask=mask).logits
    with metric_logits(model, MetricEvaluator(2, target=1)) as active:
        sliced = model(ids, attention_mask=mask).logits
    assert active and sliced.shape == (2, VOCAB)
    torch.testing.assert_close(sliced, full[torch.arange(2), torch.tensor([3, 5])])


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("cls", [LayerRelevancePatching, LayerAttributionPatching])
def test_reduce_equals_reducing_afterwards(family, cls):
    model = build_model(family).double()
    clean, corrupt = token_pair()
    parts = model_components(model)
    layers, flags, _ = parts.select()
    kwargs = dict(baselines=corrupt, attribute_to_layer_input=flags, metric=logit_diff([3, 4, 5], [6, 7, 8]),
                  additional_forward_args={"attention_mask": _mask(clean)})
    full = cls(model, layers).attribute(clean, **kwargs)
    summed = cls(model, layers).attribute(clean, reduce="sum", **kwargs)
    for f, s in zip(full, summed):
        assert s.shape == f.shape[:2]
        torch.testing.assert_close(s, f.sum(-1), rtol=1e-10, atol=1e-12)
    heads_in = cls(model, parts.attn).attribute(clean, baselines=corrupt, attribute_to_layer_input=True,
                                                metric=kwargs["metric"])
    heads = cls(model, parts.attn).attribute(clean, baselines=corrupt, attribute_to_layer_input=True,
                                             metric=kwargs["metric"], reduce="heads", num_heads=parts.num_heads)
    for f, h in zip(heads_in, heads):
        torch.testing.assert_close(h, split_heads(f, parts.num_heads), rtol=1e-10, atol=1e-12)


def test_reduce_denoising_and_no_baselines():
    model = build_model("qwen2").double()
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    relp = LayerRelevancePatching(model, layers)
    for kwargs in (dict(baselines=corrupt, direction="denoising"), dict()):
        full = relp.attribute(clean, attribute_to_layer_input=flags, target=3, **kwargs)
        summed = relp.attribute(clean, attribute_to_layer_input=flags, target=3, reduce="sum", **kwargs)
        for f, s in zip(full, summed):
            torch.testing.assert_close(s, f.sum(-1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="num_heads"):
        relp.attribute(clean, target=3, reduce="heads")
    with pytest.raises(ValueError, match="reduce"):
        relp.attribute(clean, target=3, reduce="mean")


def _gemma2_wide_window():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                       max_position_embeddings=32, sliding_window=32, query_pre_attn_scalar=8,
                                       vocab_size=VOCAB)
    config._attn_implementation = "eager"
    return transformers.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("strategy,dtype,seq", [("per-example", torch.float64, 16), ("batched", torch.float64, 16),
                                                ("batched", torch.float32, 15)])
def test_ap_on_kv_cache_is_bitwise_the_plain_path(family, strategy, dtype, seq, monkeypatch):
    model = (_gemma2_wide_window() if family == "gemma2" else build_model(family)).to(dtype)
    clean, corrupt = token_pair(seq=seq)
    parts = model_components(model)
    layers, flags, _ = parts.select()
    runs = []
    if strategy == "per-example":
        original = _prefix_cache.PrefixCacheRunner.run
        monkeypatch.setattr(_prefix_cache.PrefixCacheRunner, "run",
                            lambda self, *a, **k: runs.append(a[3]) or original(self, *a, **k))
    else:
        original = _batched_patching.BatchedPatchRunner._run
        monkeypatch.setattr(_batched_patching.BatchedPatchRunner, "_run",
                            lambda self, *a, **k: runs.append(a[0]) or original(self, *a, **k))
    ap = LayerActivationPatching(model, layers)
    options = dict(attribute_to_layer_input=flags, internal_batch_size=4)
    for kwargs in _calls(clean, positions=(12, seq - 1, 9)).values():
        runs.clear()
        fast = ap.attribute(clean, baselines=corrupt, strategy=strategy, **options, **kwargs)
        assert runs and max(runs) > 0  # suffix runs on a non-empty cache happened
        ref = ap.attribute(clean, baselines=corrupt, strategy="plain", use_cache=False, **options, **kwargs)
        assert any(r.abs().max() > 1e-6 for r in ref)
        for f, r in zip(fast, ref):
            assert f.dtype == dtype
            if dtype == torch.float64:
                assert torch.equal(f, r)
            else:  # float32 kernels (oneDNN) may block rows differently: equal to rounding
                torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-6)
    heads = dict(granularity="head", num_heads=parts.num_heads, metric=logit_diff(3, 4))
    fast = ap.attribute(clean, baselines=corrupt, attribute_to_layer_input=flags, strategy=strategy, **heads)
    ref = ap.attribute(clean, baselines=corrupt, attribute_to_layer_input=flags, strategy="plain", **heads)
    for f, r in zip(fast, ref):
        assert torch.equal(f, r) if dtype == torch.float64 else torch.allclose(f, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_ap_strategies_agree_on_layers_and_plain_metrics(family):
    """Whole-layer patching and a metric without declared positions (no cache, full logits)."""
    model = build_model(family).double()
    clean, corrupt = token_pair(seq=16)
    layers, flags, _ = model_components(model).select()
    ap = LayerActivationPatching(model, layers)
    for kwargs in (dict(granularity="layer", target=3), dict(metric=lambda logits: logits[:, -1, 3])):
        runs = {s: ap.attribute(clean, baselines=corrupt, attribute_to_layer_input=flags, strategy=s, **kwargs)
                for s in ("batched", "per-example", "plain")}
        assert any(r.abs().max() > 1e-6 for r in runs["plain"])
        for strategy in ("batched", "per-example"):
            assert all(torch.equal(f, r) for f, r in zip(runs[strategy], runs["plain"])), strategy


def test_ap_strategy_choice_and_cost_plan():
    from captum_relp.attr.layer_activation_patching import choose_strategy

    assert choose_strategy() == "batched"
    assert choose_strategy(reuse_prefix=True) == "per-example" and choose_strategy(reuse_prefix=False) == "plain"
    with pytest.raises(ValueError, match="strategy"):
        choose_strategy("fastest")
    # a deep block: merging positions into one chunk beats re-running the 29 blocks below per position
    assert _batched_patching.chunk_cost(60, 4, 29, 30) < 4 * _batched_patching.chunk_cost(15, 1, 29, 30)
    model = build_model("llama")
    clean, corrupt = token_pair(seq=16)
    layers = model_components(model).mlp
    runner = _batched_patching.BatchedPatchRunner(model, layers, [False] * len(layers), (clean,), (), {},
                                                  MetricEvaluator(clean.shape[0], target=3), True, "position")
    copies = [(i, (t,)) for i in range(len(layers)) for t in range(16)]
    plan = runner.plan(copies, internal_batch_size=64, width=16)
    assert sorted(c for _, chunk in plan for c in chunk) == sorted(copies)  # every copy exactly once
    assert all(t0 <= min(loc[0] for _, loc in chunk) for t0, chunk in plan)
    assert all(len({runner.block_of[i] for i, _ in chunk}) == 1 for _, chunk in plan)  # one block per chunk


def test_ap_keeps_plain_path_for_bert_and_unknown_metrics(monkeypatch):
    monkeypatch.setattr(_prefix_cache.PrefixCacheRunner, "run", lambda *a, **k: pytest.fail("cached path used"))
    model = build_model("bert")
    clean, corrupt = token_pair()
    LayerActivationPatching(model, model_components(model).mlp).attribute(clean, baselines=corrupt, target=3)
    gpt2 = build_model("gpt2")
    LayerActivationPatching(gpt2, model_components(gpt2).mlp).attribute(
        clean, baselines=corrupt, metric=lambda logits: logits[:, -1, 3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_paths_match_reference():
    model = build_model("llama").double().cuda()
    clean, corrupt = (t.cuda() for t in token_pair(seq=16))
    layers, flags, _ = model_components(model).select()
    kwargs = dict(baselines=corrupt, attribute_to_layer_input=flags, metric=logit_diff([3, 4, 5], [6, 7, 8]))
    with full_logits():
        ref = LayerRelevancePatching(model, layers).attribute(clean, **kwargs)
    fast = LayerRelevancePatching(model, layers).attribute(clean, reduce="sum", **kwargs)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r.sum(-1), rtol=1e-9, atol=1e-11)
    ap = LayerActivationPatching(model, layers)
    cached = ap.attribute(clean, **kwargs)
    plain = ap.attribute(clean, use_cache=False, **kwargs)
    for c, p in zip(cached, plain):
        torch.testing.assert_close(c, p, rtol=1e-9, atol=1e-11)


def test_caller_logits_to_keep_is_left_alone():
    model = build_model("gpt2")
    with metric_logits(model, MetricEvaluator(1, target=1)):
        logits = model(torch.tensor([[1, 2, 3, 4]]), logits_to_keep=2).logits
    torch.testing.assert_close(logits, model(torch.tensor([[1, 2, 3, 4]])).logits[:, -2:])


def test_ig_reduce_equals_reducing_afterwards():
    model = build_model("gpt2").double()
    clean, corrupt = token_pair()
    parts = model_components(model)
    ig = LayerIntegratedGradientsPatching(model, parts.attn)
    kwargs = dict(baselines=corrupt, attribute_to_layer_input=True, metric=logit_diff(3, 4), n_steps=3)
    full = ig.attribute(clean, **kwargs)
    summed = ig.attribute(clean, reduce="sum", **kwargs)
    heads = ig.attribute(clean, reduce="heads", num_heads=parts.num_heads, **kwargs)
    for f, s, h in zip(full, summed, heads):
        torch.testing.assert_close(s, f.sum(-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h, split_heads(f, parts.num_heads), rtol=1e-10, atol=1e-12)
