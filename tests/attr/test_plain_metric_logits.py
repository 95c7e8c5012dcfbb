"""Issue 20: a plain callable metric gets logits only where it reads; the corrupt pass gets none."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import VOCAB, build_model, token_pair

from captum_relp import (
    LayerActivationPatching,
    LayerAttributionPatching,
    LayerIntegratedGradientsPatching,
    LayerRelevancePatching,
    logit_diff,
    model_components,
)
from captum_relp._forward import full_logits
from captum_relp._read_positions import check_positions, normalize_positions, search_positions

METRICS = {
    "last": (lambda logits: logits[:, -1, 3] - logits[:, -1, 4], [-1]),
    "two": (lambda logits: logits[:, 2, 3] * logits[:, -1, 5] + logits[:, 2, 7], [2, -1]),
    "all": (lambda logits: logits.log_softmax(-1)[:, :, 4].sum(1), None),
}


class _HeadRows:
    """Rows that go through the unembedding, per call (counted on its input after every pre-hook)."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: self.rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))

    def __enter__(self):
        return self.rows

    def __exit__(self, *exc):
        self.handle.remove()


def _attribute(cls, model, layers, flags, clean, corrupt, **kwargs):
    return cls(model, layers).attribute(clean, baselines=corrupt, attribute_to_layer_input=flags, **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("cls", [LayerRelevancePatching, LayerAttributionPatching])
@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_plain_metric_equal_to_full_logits(family, cls, direction):
    model = build_model(family)
    clean, corrupt = token_pair()
    layers, flags, _ = model_components(model).select()
    for name, (metric, positions) in METRICS.items():
        for given in (None, positions) if positions else (None,):
            with _HeadRows(model) as rows:
                fast = _attribute(cls, model, layers, flags, clean, corrupt, metric=metric, direction=direction,
                                  logit_positions=given)
            with full_logits(), _HeadRows(model) as full_rows:
                ref = _attribute(cls, model, layers, flags, clean, corrupt, metric=metric, direction=direction)
            assert full_rows == [clean.numel(), clean.numel()]  # the reference computes every position
            assert any(r.abs().max() > 1e-4 for r in ref), name
            assert all(torch.equal(f, r) for f, r in zip(fast, ref)), (name, given)
            # the run without the metric (corrupt; clean for denoising) computes no logits at all
            expected = clean.numel() if positions is None else 8  # 3 or 6 rows, padded to whole blocks of 8
            # positions found on a probe are checked against the full logits of the same run
            check = [clean.numel()] if given is None and positions is not None else []
            assert rows == [0, expected] + check, (name, rows)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_plain_metric_ap_and_ig_equal_to_full_logits(family):
    model = build_model(family)
    clean, corrupt = token_pair()
    parts = model_components(model)
    layers, flags = [parts.blocks[1], parts.mlp[0]], [True, False]
    for cls, name in [(c, n) for c in (LayerActivationPatching, LayerIntegratedGradientsPatching)
                      for n in ("two", "last")]:
        metric, positions = METRICS[name]  # declared: no check against the full logits
        with _HeadRows(model) as rows:
            fast = _attribute(cls, model, layers, flags, clean, corrupt, metric=metric, logit_positions=positions)
        with full_logits(), _HeadRows(model) as full_rows:
            ref = _attribute(cls, model, layers, flags, clean, corrupt, metric=metric)
        assert rows and sum(rows) < sum(full_rows) / 2, (cls, name, rows, full_rows)  # 1 or 2 of 7 positions
        assert any(r.abs().max() > 1e-6 for r in ref)
        assert all(torch.equal(f, r) for f, r in zip(fast, ref)), (cls, name)


def test_metric_reading_from_the_end_is_shown_only_that_suffix():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    seen = []

    def metric(logits):
        seen.append(tuple(logits.shape))
        return logits[:, -1, 3] - logits[:, -2, 4]

    layers = model_components(model).mlp
    fast = LayerRelevancePatching(model, layers).attribute(clean, baselines=corrupt, metric=metric)
    assert seen[-1] == (3, 2, VOCAB)  # probes first, then the clean run: positions 5 and 6 only
    with full_logits():
        ref = LayerRelevancePatching(model, layers).attribute(clean, baselines=corrupt, metric=metric)
    assert seen[-1] == (3, 7, VOCAB)
    assert all(torch.equal(f, r) for f, r in zip(fast, ref))


def test_wrong_logit_positions_raise_naming_the_argument():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    relp = LayerRelevancePatching(model, model_components(model).mlp)
    metric, _ = METRICS["two"]
    with pytest.raises(ValueError, match=r"logit_positions=\[-1\] but the metric reads other positions"):
        relp.attribute(clean, baselines=corrupt, metric=metric, logit_positions=[-1])
    with pytest.raises(ValueError, match=r"logit_positions \[7\] are outside a sequence of 7"):
        relp.attribute(clean, baselines=corrupt, metric=metric, logit_positions=[2, 7])
    with pytest.raises(ValueError, match="logit_positions is for a plain callable metric"):
        relp.attribute(clean, baselines=corrupt, target=3, logit_positions=[-1])
    with pytest.raises(ValueError, match="logit_positions is for a plain callable metric"):
        relp.attribute(clean, baselines=corrupt, metric=logit_diff(3, 4), logit_positions=[-1])
    net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 4), torch.nn.Linear(4, VOCAB))
    with pytest.raises(ValueError, match="logit_positions applies to Hugging Face causal language models"):
        LayerRelevancePatching(net, net[0], "none").attribute(
            clean, baselines=corrupt, metric=lambda out: out[:, -1, 0], logit_positions=[-1])


def test_search_finds_exactly_the_positions_read():
    rows = torch.tensor([1, 4, 6])
    per_row = lambda logits: logits[torch.arange(3), rows, 2]  # noqa: E731
    assert search_positions(per_row, 3, 8, 5) == (1, 4, 6)
    assert search_positions(lambda logits: logits[:, 0].max(-1).values, 3, 8, 5) == (0,)
    assert normalize_positions([-1, 0, -8], 8) == (0, 7)


@pytest.mark.parametrize("metric", [
    lambda logits: logits.mean((1, 2)),  # every position: nothing to gain
    lambda logits: torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).sum((1, 2)),  # blind to NaN/inf
    lambda logits: logits.add_(1)[:, -1, 0],  # in place: cannot take a probe
    lambda logits: logits[:, -1, 0] + torch.rand(logits.shape[0]),  # not deterministic
    lambda logits: logits[:, -1, 0].mean(),  # wrong shape
], ids=["all", "nan-blind", "in-place", "random", "shape"])
def test_search_gives_up_rather_than_guess(metric):
    assert search_positions(metric, 3, 8, 5) is None


def test_check_positions_catches_value_sensitive_reads():
    # reads position 2 only where position 5 is large: the verification fills move it
    metric = lambda logits: torch.where(logits[:, 5, 0] > 1.0, logits[:, 2, 0], logits[:, 7, 0])  # noqa: E731
    with pytest.raises(ValueError, match="logit_positions"):
        check_positions(metric, (7,), 3, 8, 5)
    assert search_positions(metric, 3, 8, 5) is None


def _top_token_position(token):
    """Reads the first position whose largest logit is ``token`` (else the last): chosen from the values."""
    def metric(logits):
        top = logits.argmax(-1) == token
        first = torch.where(top.any(1), top.float().argmax(1), logits.shape[1] - 1)
        return logits[torch.arange(logits.shape[0]), first, 4]
    return metric


def _first_confident_position(token, threshold):
    """Reads the first position whose ``token`` probability passes ``threshold`` (else the last)."""
    def metric(logits):
        passed = logits.softmax(-1)[:, :, token] > threshold
        first = torch.where(passed.any(1), passed.float().argmax(1), logits.shape[1] - 1)
        return logits[torch.arange(logits.shape[0]), first, token] - logits[:, -1, 6]
    return metric


def _fooling_threshold(logits):
    """A token and threshold that an earlier position passes, the last position and the
    probes' uniform probabilities (1 / V) do not."""
    probs = logits.softmax(-1)
    floor = probs[:, -1].amax(0).clamp(min=1.0 / logits.shape[-1])
    earlier = probs[:, :-1].amax((0, 1))
    token = int((earlier - floor).argmax())
    assert earlier[token] > floor[token]
    return token, float(earlier[token] + floor[token]) / 2


@pytest.mark.parametrize("kind", ["top-token-position", "threshold-position"])
@pytest.mark.parametrize("cls", [LayerRelevancePatching, LayerAttributionPatching, LayerActivationPatching,
                                 LayerIntegratedGradientsPatching])
def test_metric_choosing_positions_from_values_equals_full_logits(cls, kind):
    """Metrics whose read positions depend on the logit values: the probes find other positions
    than the real logits pick, and the scores must still equal the full-logits path."""
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    layers = model_components(model).mlp
    with torch.no_grad(), full_logits():
        logits = model(clean).logits
    if kind == "top-token-position":  # the token most often on top before the last position
        metric = _top_token_position(int(logits[:, :-1].argmax(-1).flatten().mode().values))
    else:
        metric = _first_confident_position(*_fooling_threshold(logits))
    # the case the check exists for: the probes find only the last position, the real logits
    # make the metric read an earlier one
    assert search_positions(metric, clean.shape[0], clean.shape[1], VOCAB) == (clean.shape[1] - 1,)
    with torch.no_grad():
        assert not torch.equal(metric(logits), metric(logits[:, -1:].expand_as(logits)))
    fast = cls(model, layers).attribute(clean, baselines=corrupt, metric=metric)
    with full_logits():
        ref = cls(model, layers).attribute(clean, baselines=corrupt, metric=metric)
    assert any(r.abs().max() > 1e-4 for r in ref)
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r, rtol=1e-6, atol=1e-6 * float(r.abs().max())), cls
