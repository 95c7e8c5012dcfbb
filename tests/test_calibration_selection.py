"""Noise-aware selection of calibrated rules, candidate sets and degenerate calibration data."""
import json
import math
import warnings

import pytest
import torch
from tests.conftest import build_model, token_pair
from tests.test_calibration import metric, two_branch_case

from captum_relp import RuleSet, calibrate_rules, model_components
from captum_relp.calibration._select import GroupData, bootstrap_weights, select, weighted_agreements
from captum_relp.calibration import CalibrationWarning, agreement, default_candidates


def noisy_group(n=20, width=10, seed=0, gradient_noise=1.0, candidate_noise=0.97):
    gen = torch.Generator().manual_seed(seed)
    ap = torch.randn(n, width, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, width, generator=gen, dtype=torch.float64)
    other = torch.randn(n, width, generator=gen, dtype=torch.float64)
    scores = {"gradient": ap + gradient_noise * noise, "close": ap + candidate_noise * other, "exact": 2 * ap}
    return GroupData(ap, scores, torch.ones_like(ap, dtype=torch.bool))


def test_bootstrap_agreement_equals_the_explicit_resample():
    data = noisy_group()
    weights = bootstrap_weights(20, 5, seed=3)
    for name in data.scores:
        fast = weighted_agreements(data, name, weights, "pearson")
        assert fast[0] == pytest.approx(agreement(data.scores[name], data.reference), abs=1e-12)
        for row, value in zip(weights[1:], fast[1:]):
            rows = torch.repeat_interleave(torch.arange(20), row.long())
            explicit = agreement(data.scores[name][rows], data.reference[rows])
            assert value == pytest.approx(explicit, abs=1e-12)
        slow = weighted_agreements(data, name, weights, "spearman")
        assert slow[0] == pytest.approx(agreement(data.scores[name], data.reference, "spearman"))


def test_a_small_lead_within_the_noise_keeps_the_gradient_and_warns():
    data = noisy_group()
    del data.scores["exact"]
    gradient, close = (agreement(data.scores[n], data.reference) for n in ("gradient", "close"))
    assert 0 < close - gradient < 0.05  # the candidate looks better on the calibration pairs
    sel = select(data, "gradient", group="attn")
    assert sel.choice == "gradient" and sel.decision == "undecided" and "cannot decide" in sel.note
    lo, hi = sel.margin_interval["close"]
    assert lo <= 0 < hi and sel.margin["close"] == pytest.approx(close - gradient)
    assert sel.interval["close"][0] < sel.agreement["close"] < sel.interval["close"][1]


def test_a_lead_beyond_the_noise_is_chosen():
    sel = select(noisy_group(), "gradient")
    assert sel.choice == "exact" and sel.decision == "chosen"
    assert sel.agreement["exact"] == pytest.approx(1.0) and sel.margin_interval["exact"][0] > 0


def test_default_candidates_span_the_rule_categories_the_model_has():
    llama, gpt2 = build_model("llama"), build_model("gpt2")
    names = [c.name for c in default_candidates(llama)]
    assert len(names) == 16 and names[0] == "gradient"
    # the set that won on a gated-MLP model in issue 23: LN + Identity without the Half-rule
    by_name = {c.name: c for c in default_candidates(llama)}
    assert by_name["ln+identity"].categories == ("norm", "activation") and by_name["ln+identity"].attention is None
    assert by_name["relp-ah"].attention is not None
    assert [c.name for c in default_candidates(gpt2)] == ["gradient", "ln", "identity", "relp", "ah", "ln+ah",
                                                          "identity+ah", "relp-ah"]
    clean, corrupt = token_pair(batch=4, seq=5)
    layers, flags, _ = model_components(llama).select(["mlp"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibrate_rules(llama, layers, clean, corrupt, attribute_to_layer_input=flags,
                              metric=lambda out: out[:, -1, 1] - out[:, -1, 2], n_bootstrap=50)
    assert cal.info["candidates_run"] == 16 and set(cal.agreement["mlp"]) == set(names)


def test_clean_equal_to_corrupt_raises():
    net, clean, _ = two_branch_case()
    with pytest.raises(ValueError, match="no effect"):
        calibrate_rules(net, [net.a, net.b], clean, clean.clone(), metric=metric)


def test_zero_effect_everywhere_raises():
    net, clean, corrupt = two_branch_case()
    corrupt = clean.clone()
    corrupt[0, 0, -1] += 1.0  # differs, but only at a position the metric ignores through layer a
    net.read_b.weight.data.zero_()
    with pytest.raises(ValueError, match="no effect"):
        calibrate_rules(net, [net.b], clean, corrupt, metric=metric)


def test_a_group_without_effect_warns_and_never_reports_nan():
    net, clean, corrupt = two_branch_case()
    d = clean.shape[-1] // 2
    corrupt[..., d:] = clean[..., d:]  # the LN branch is not corrupted: AP is zero on layer b
    with pytest.warns(CalibrationWarning, match="zero everywhere in group 'ln'") as record:
        cal = calibrate_rules(net, [net.a, net.b], clean, corrupt, metric=metric, groups=["tanh", "ln"])
    assert record[0].filename == __file__  # the warning points at the caller
    assert cal.choices["ln"] == "gradient" and cal.selection["ln"]["decision"] == "no-effect"
    assert all(v is None for v in cal.agreement["ln"].values())
    json.loads(cal.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert "nan" not in cal.summary().lower()


def test_summary_and_json_report_interval_and_margin():
    net, clean, corrupt = two_branch_case()
    cal = calibrate_rules(net, [net.a, net.b], clean, corrupt, metric=metric, groups=["tanh", "ln"],
                          default="gradient")
    data = json.loads(cal.to_json())
    sel = data["selection"]["tanh"]
    assert sel["choice"] == cal.choices["tanh"] != "gradient" and sel["decision"] == "chosen"
    assert sel["margin_interval"][sel["choice"]][0] > 0
    assert sel["interval"]["gradient"][0] <= sel["agreement"]["gradient"] <= sel["interval"]["gradient"][1]
    assert data["default"] == "gradient" and data["confidence"] == 0.95 and data["n_bootstrap"] == 1000
    text = cal.summary()
    assert "margin interval" in text and "interval" in text.splitlines()[-2]
    assert text.splitlines()[-1].startswith("cost: activation patching once, then one clean and one corrupt "
                                            "forward pass and one backward pass per candidate (4)")
    assert data["info"]["candidates_seconds"] > 0 and data["info"]["ap_seconds"] > 0
    assert math.isfinite(sel["margin"][sel["choice"]])


def test_default_must_be_a_candidate():
    net, clean, corrupt = two_branch_case()
    with pytest.raises(ValueError, match="default 'x' is not one of the candidates"):
        calibrate_rules(net, [net.a], clean, corrupt, metric=metric, default="x")
    # no preset among the candidates: the first candidate is the default
    candidates = [RuleSet("ln", categories=("norm",)), RuleSet("identity", categories=("activation",))]
    cal = calibrate_rules(net, [net.a], clean, corrupt, metric=metric, candidates=candidates)
    assert cal.default == "ln"
    # a preset among them: the best preset is
    cal = calibrate_rules(net, [net.a], clean, corrupt, metric=metric, candidates=[RuleSet("relp")] + candidates)
    assert cal.default == "best-preset"


def test_best_preset_default_keeps_the_better_preset_the_pairs_cannot_separate():
    """A preset slightly better than the gradient, not beyond the noise: the gradient default keeps the
    gradient (undecided); ``default="best-preset"``, the default, keeps that preset. The file round-trips."""
    import torch

    from captum_relp import RuleSet
    from captum_relp.calibration import CandidateScores, choose_rules
    from captum_relp.calibration._select import group_data
    from captum_relp.rules import AHRule

    gen = torch.Generator().manual_seed(0)
    ap = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    noise = lambda scale: ap + scale * torch.randn(12, 30, generator=gen, dtype=torch.float64)  # noqa: E731
    scores = {"gradient": noise(1.0), "relp": noise(0.9), "relp-ah": noise(1.3)}
    candidates = [RuleSet("gradient", categories=()), RuleSet("relp"), RuleSet("relp-ah", attention=AHRule())]
    data = CandidateScores(candidates, ["mlp"], False, group_data([ap], {n: [s] for n, s in scores.items()}, ["mlp"]),
                           0.0)
    with pytest.warns(CalibrationWarning, match="cannot decide"):
        kept = choose_rules(data, default="gradient")
    assert kept.choices["mlp"] == "gradient" and kept.selection["mlp"]["decision"] == "undecided"
    best = choose_rules(data)
    assert choose_rules(data, default="best-preset").choices == best.choices
    agreements = best.selection["mlp"]["agreement"]
    assert best.choices["mlp"] == "relp" == max(agreements, key=agreements.get)
    assert best.selection["mlp"]["decision"] == "default" and best.default == "best-preset"
    assert type(best).from_json(best.to_json()).choices == best.choices
    with pytest.raises(ValueError, match="best-preset"):
        choose_rules(CandidateScores([RuleSet("ln", categories=("norm",))], ["mlp"], False,
                                     group_data([ap], {"ln": [scores["relp"]]}, ["mlp"]), 0.0), default="best-preset")
