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
from captum_relp.calibration import CandidateScores, bootstrap_interval, choose_rules, paired_bootstrap
from captum_relp.calibration._schema import model_signature


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


def test_paired_bootstrap_is_the_selection_bootstrap_and_its_interval_is_paired():
    data = noisy_group()
    boot = paired_bootstrap(data.reference.reshape(20, 2, 5), {n: s.reshape(20, 2, 5) for n, s in data.scores.items()},
                            n_bootstrap=50, seed=3)
    weights = bootstrap_weights(20, 50, seed=3)
    for name in data.scores:
        assert torch.equal(boot[name], weighted_agreements(data, name, weights, "pearson"))
    assert boot["exact"][0] == pytest.approx(1.0) and boot["gradient"][0] == pytest.approx(
        agreement(data.scores["gradient"], data.reference), abs=1e-12)
    low, high = bootstrap_interval((boot["exact"] - boot["gradient"])[1:])  # exact beats gradient on every resample
    assert 0 < low <= high and bootstrap_interval(boot["exact"][1:]) == pytest.approx([1.0, 1.0])
    padded = {n: torch.cat([s, torch.zeros(20, 3, dtype=s.dtype)], 1) for n, s in data.scores.items()}
    reference = torch.cat([data.reference, torch.zeros(20, 3, dtype=torch.float64)], 1)
    padding_dropped = paired_bootstrap(reference, padded, n_bootstrap=50, seed=3)["close"]
    assert torch.allclose(padding_dropped, boot["close"], rtol=0, atol=1e-12)
    kept = paired_bootstrap(reference, padded, reference != 0, n_bootstrap=50, seed=3, score="spearman")["close"]
    assert kept[0] == pytest.approx(agreement(data.scores["close"], data.reference, "spearman"))


def test_bootstrap_interval_values_and_undefined_resamples():
    assert bootstrap_interval(torch.arange(101.0), level=0.5) == [25.0, 75.0]
    assert bootstrap_interval(torch.arange(101.0)) == pytest.approx([2.5, 97.5])
    some_nan = torch.cat([torch.arange(95.0), torch.full((5,), math.nan)])
    assert bootstrap_interval(some_nan, level=1.0) == [0.0, 94.0]  # NaN dropped
    assert bootstrap_interval(torch.cat([torch.arange(80.0), torch.full((20,), math.nan)])) is None
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(torch.arange(5.0), level=95)


def test_paired_bootstrap_refuses_bad_input():
    ap = torch.randn(6, 4)
    for kwargs, message in [(dict(scores={"a": torch.randn(6, 5)}), r"scores\['a'\] has shape \(6, 5\)"),
                            (dict(scores={"a": ap}, mask=torch.ones(6, 3, dtype=torch.bool)), "mask has shape"),
                            (dict(scores={"a": ap}, n_bootstrap=0), "n_bootstrap"),
                            (dict(scores={"a": ap}, score="cosine"), "score must be one of"),
                            (dict(scores={}), "at least one method")]:
        with pytest.raises(ValueError, match=message):
            paired_bootstrap(ap, **kwargs)


def test_candidate_scores_from_layer_scores():
    """Per-layer scores measured elsewhere give the scores score_candidates would: per group, ready to choose."""
    gen = torch.Generator().manual_seed(1)
    ap = [torch.randn(12, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    noisy = [a + torch.randn(12, 3, generator=gen, dtype=torch.float64) for a in ap]
    candidates = [RuleSet("gradient", categories=()), RuleSet("exact")]
    per_layer = {"gradient": [ap[0].numpy(), noisy[1].numpy(), noisy[2].numpy()], "exact": ap}
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    scores = CandidateScores.from_layer_scores(candidates, [a.numpy() for a in ap], per_layer, ["a", "b", "b"],
                                               tolerance=1e-9, model=net)
    assert scores.groups == ["a", "b", "b"] and not scores.auto_groups and scores.tolerance == 1e-9
    assert scores.n_examples == 12 and scores.model == model_signature(net) and scores.model is not None
    assert torch.equal(scores.data["b"].reference, torch.cat(ap[1:], 1))
    assert torch.equal(scores.data["b"].scores["gradient"], torch.cat(noisy[1:], 1))
    assert list(scores.data["a"].scores) == ["gradient", "exact"]
    rules = choose_rules(scores, default="gradient", n_bootstrap=200)
    assert rules.agreement["a"]["exact"] == pytest.approx(1.0) == rules.agreement["a"]["gradient"]
    assert rules.choices == {"a": "gradient", "b": "exact"} and rules.model == scores.model
    assert CandidateScores.from_layer_scores(candidates, ap, per_layer, ["a", "b", "b"], auto_groups=True).auto_groups
    bad = [(dict(scores={"gradient": per_layer["gradient"]}), "exactly the candidates"),
           (dict(groups=["a", "b"]), "groups has 2 labels for 3 layers"),
           (dict(scores={**per_layer, "exact": [ap[0], ap[1], ap[2][:, :2]]}), r"scores\['exact'\] has layers"),
           (dict(reference=[ap[0], ap[1], ap[2][:5]], scores={n: [ap[0], ap[1], ap[2][:5]] for n in per_layer}),
            "first dimension"),
           (dict(candidates=[RuleSet("exact"), RuleSet("exact")]), "distinct names"),
           (dict(tolerance=-1.0), "tolerance")]
    for change, message in bad:
        kwargs = {"candidates": candidates, "reference": ap, "scores": per_layer, "groups": ["a", "b", "b"], **change}
        tolerance = kwargs.pop("tolerance", 0.0)
        with pytest.raises(ValueError, match=message):
            CandidateScores.from_layer_scores(**kwargs, tolerance=tolerance)

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
