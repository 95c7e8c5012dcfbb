"""calibrate_rules / CalibratedRules and LayerRelevancePatching(rules=CalibratedRules)."""
import math

import pytest
import torch
from tests.conftest import build_model, model_state, token_pair
from torch import nn

from captum_relp import (
    CalibratedRules,
    LayerRelevancePatching,
    RuleSet,
    calibrate_rules,
    model_components,
)
from captum_relp.calibration import agreement, calibrated_ioi_rules, explicit_ruleset, infer_groups


class TwoBranches(nn.Module):
    """Tanh branch (layer ``a``) and LayerNorm branch (layer ``b``), summed per position.

    With the corrupt input zero on the tanh branch, the Identity-rule is exact there
    (tanh(x) - tanh(0) = tanh(x)/x * x); with the corrupt input a feature permutation of
    the clean one on the LN branch, mean and std are unchanged and the LN-rule is exact.
    """

    def __init__(self, d=6):
        super().__init__()
        self.a, self.b = nn.Identity(), nn.Identity()
        self.act, self.ln = nn.Tanh(), nn.LayerNorm(d)
        self.read_a, self.read_b = nn.Linear(d, 1), nn.Linear(d, 1)
        with torch.no_grad():
            self.ln.weight.normal_(1.0, 0.5)
            self.ln.bias.normal_()

    def forward(self, x):
        xa, xb = x.chunk(2, dim=-1)
        return self.read_a(self.act(self.a(xa))) + self.read_b(self.ln(self.b(xb)))


def metric(out):
    return out[..., 0].sum(-1)


def two_branch_case(d=6):
    torch.manual_seed(0)
    net = TwoBranches(d).eval()
    clean = 2 * torch.randn(3, 5, 2 * d)
    corrupt = clean.clone()
    corrupt[..., :d] = 0
    corrupt[..., d:] = clean[..., d:][..., torch.randperm(d)]
    return net, clean, corrupt


def test_constructed_case_picks_the_exact_rules():
    net, clean, corrupt = two_branch_case()
    layers = [net.a, net.b]
    cal = calibrate_rules(net, layers, clean, corrupt, metric=metric, groups=["tanh", "ln"])
    for group in ("tanh", "ln"):
        row = cal.agreement[group]
        assert row[cal.choices[group]] == pytest.approx(1.0, abs=1e-6)
        assert row[cal.choices[group]] == max(row.values())
        assert row["gradient"] < 0.99
    # where only one candidate is exact, it is the choice
    candidates = [RuleSet("gradient", categories=()), RuleSet("ln", categories=("norm",)),
                  RuleSet("identity", categories=("activation",))]
    cal = calibrate_rules(net, layers, clean, corrupt, metric=metric, groups=["tanh", "ln"],
                          candidates=candidates)
    assert cal.choices == {"tanh": "identity", "ln": "ln"}
    assert cal.agreement["tanh"]["ln"] < 0.99 and cal.agreement["ln"]["identity"] < 0.99
    # calibrated RelP reproduces AP exactly on both layers
    from captum_relp import LayerActivationPatching

    ap = LayerActivationPatching(net, layers).attribute(clean, baselines=corrupt, metric=metric)
    relp = LayerRelevancePatching(net, layers, rules=cal).attribute(clean, baselines=corrupt, metric=metric)
    for a, r in zip(ap, relp):
        assert torch.allclose(a, r.sum(-1), atol=1e-5)


def test_gradient_exact_case_keeps_the_gradient_without_warning(recwarn):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    clean, corrupt = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    candidates = [RuleSet("relp"), RuleSet("gradient", categories=()), RuleSet("ln", categories=("norm",))]
    cal = calibrate_rules(net, [net[0]], clean, corrupt, metric=metric, candidates=candidates)
    row = cal.agreement["Linear"]
    assert all(row[n] == pytest.approx(1.0) for n in ("relp", "gradient", "ln"))
    # the default is the best preset; on a tie the gradient, the first preset, is kept
    assert cal.default == "best-preset" and cal.choices == {"Linear": "gradient"}
    assert cal.selection["Linear"]["decision"] == "default"
    assert not [w for w in recwarn if "cannot decide" in str(w.message)]
    # a linear-only model has no rule category: the only default candidate is the gradient
    assert list(calibrate_rules(net, [net[0]], clean, corrupt, metric=metric).candidates) == ["gradient"]


def test_json_round_trip(tmp_path):
    net, clean, corrupt = two_branch_case()
    cal = calibrate_rules(net, [net.a, net.b], clean, corrupt, metric=metric, score="spearman")
    path = tmp_path / "rules.json"
    cal.save(path)
    loaded = CalibratedRules.load(path)
    assert loaded.choices == cal.choices and loaded.agreement == cal.agreement
    assert loaded.groups == cal.groups and loaded.score == "spearman"
    assert [repr(r) for r in loaded.candidates.values()] == [repr(r) for r in cal.candidates.values()]
    kwargs = dict(baselines=corrupt, metric=metric)
    first = LayerRelevancePatching(net, [net.a, net.b], rules=cal).attribute(clean, **kwargs)
    second = LayerRelevancePatching(net, [net.a, net.b], rules=loaded).attribute(clean, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert "*" in cal.summary()


def test_calibrated_equals_each_group_run_separately():
    model = build_model("llama")
    clean, corrupt = token_pair(batch=2, seq=5)
    layers, flags, labels = model_components(model).select(["resid", "attn", "mlp"])
    candidates = {"relp": RuleSet("relp"), "gradient": RuleSet("gradient", categories=()),
                  "ln": RuleSet("ln", categories=("norm",))}
    choices = {"resid": "relp", "attn": "gradient", "mlp": "ln"}
    groups = [kind for kind, _ in labels]
    cal = CalibratedRules(candidates, choices, {}, groups)
    met = lambda out: out[:, -1, 1] - out[:, -1, 2]  # noqa: E731
    forwards = []
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    together = LayerRelevancePatching(model, layers, rules=cal).attribute(
        clean, baselines=corrupt, metric=met, attribute_to_layer_input=flags)
    handle.remove()
    assert len(forwards) == 1 + 3  # shared corrupt forward + one pass per distinct rule set
    for group, name in choices.items():
        idx = [i for i, g in enumerate(groups) if g == group]
        alone = LayerRelevancePatching(model, [layers[i] for i in idx], rules=explicit_ruleset(candidates[name]))
        scores = alone.attribute(clean, baselines=corrupt, metric=met,
                                 attribute_to_layer_input=[flags[i] for i in idx])
        for i, s in zip(idx, scores):
            assert torch.allclose(together[i], s)
    # two groups sharing a rule set share a pass
    forwards.clear()
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    LayerRelevancePatching(model, layers, rules=CalibratedRules(candidates, dict(choices, mlp="relp"), {},
                                                                groups)).attribute(
        clean, baselines=corrupt, metric=met, attribute_to_layer_input=flags)
    handle.remove()
    assert len(forwards) == 1 + 2


def test_errors():
    net, clean, corrupt = two_branch_case()
    with pytest.raises(ValueError, match="groups has 1 labels but there are 2 layers"):
        calibrate_rules(net, [net.a, net.b], clean, corrupt, metric=metric, groups=["x"])
    with pytest.raises(ValueError, match="score must be one of"):
        calibrate_rules(net, [net.a], clean, corrupt, metric=metric, score="kendall")
    with pytest.raises(ValueError, match="distinct names"):
        calibrate_rules(net, [net.a], clean, corrupt, metric=metric, candidates=[RuleSet("x"), RuleSet("x")])
    cal = calibrate_rules(net, [net.a], clean, corrupt, metric=metric)
    with pytest.raises(ValueError, match="was not calibrated"):
        LayerRelevancePatching(net, [net.ln], rules=cal).attribute(clean, baselines=corrupt, metric=metric)
    explicit = cal.with_groups(["Identity"])
    with pytest.raises(ValueError, match="explicit groups for 1 layers"):
        LayerRelevancePatching(net, [net.a, net.b], rules=explicit).attribute(clean, baselines=corrupt,
                                                                             metric=metric)


def test_scores():
    x, y = torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([1.0, 3.0, 2.0, 9.0])
    assert agreement(x, y, "topk") == 1.0
    assert agreement(x, -y, "pearson") < 0
    assert math.isnan(agreement(torch.ones(3), y[:3]))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "qwen2", "gemma2", "bert"])
def test_families(family):
    model = build_model(family)
    clean, corrupt = token_pair(batch=2, seq=5)
    layers, flags, _ = model_components(model).select(["resid", "attn", "mlp"])
    met = lambda out: out[:, -1, 1] - out[:, -1, 2]  # noqa: E731
    before, state = model(clean).logits, model_state(model)
    cal = calibrate_rules(model, layers, clean, corrupt, metric=met, attribute_to_layer_input=flags)
    assert set(cal.choices) == {"resid", "attn", "mlp"}
    assert "relp-ah" in cal.candidates and "gradient" in cal.candidates
    assert all(v is None or math.isfinite(v) for row in cal.agreement.values() for v in row.values())
    assert infer_groups(model, layers, flags) == cal.groups
    scores = LayerRelevancePatching(model, layers, rules=cal).attribute(
        clean, baselines=corrupt, metric=met, attribute_to_layer_input=flags)
    assert len(scores) == len(layers) and all(torch.isfinite(s).all() for s in scores)
    assert torch.equal(model(clean).logits, before) and model_state(model) == state


def test_calibrated_ioi_rules_avoids_evaluated_prompts():
    from captum_relp.embedded import load_embedded
    from captum_relp.tasks.ioi import generate_ioi_pairs

    model, tok = load_embedded("tiny-gpt2-ioi")
    evaluated = generate_ioi_pairs(3, seed=1, tokenizer=tok)
    cal = calibrated_ioi_rules(model, tok, n_prompts=2, seed=0, exclude=evaluated, kinds=("mlp",))
    assert len(cal.info["calibration_prompts"]) == 2
    assert not set(cal.info["calibration_prompts"]) & {p.clean_prompt for p in evaluated}
    assert set(cal.choices) == {"mlp"}


def test_spearman_gives_ties_their_average_rank():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(300), torch.randn(10, generator=gen)])  # 300 shared zeros
    y = torch.cat([torch.zeros(300), torch.randn(10, generator=gen)])  # 10 uncorrelated entries
    assert agreement(x, y, "spearman") == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert agreement(x, y, "spearman") < 0.5  # ranking the tied zeros apart gave 0.93
    ties = torch.tensor([1.0, 2.0, 2.0, 3.0, 3.0, 3.0, -1.0, 0.0])
    other = torch.tensor([0.5, 0.5, 2.0, 1.0, 4.0, 4.0, 4.0, -2.0])
    assert agreement(ties, other, "spearman") == pytest.approx(stats.spearmanr(ties, other).statistic, abs=1e-12)
    assert math.isnan(agreement(torch.ones(4), other[:4], "spearman"))
    assert math.isnan(agreement(torch.tensor([1.0, float("nan"), 2.0]), other[:3], "spearman"))


def test_score_candidates_holds_exactly_ap_and_each_candidates_relp():
    """``score_candidates`` keeps, per group, AP's and each candidate's RelP scores summed over
    hidden units, recomputed here with the public classes; ``choose_rules`` reports each
    candidate's agreement as the Pearson correlation of those scores over the kept entries."""
    from captum_relp import LayerActivationPatching, LayerRelevancePatching, model_components
    from captum_relp.calibration import choose_rules, score_candidates
    from captum_relp.calibration.calibrated_rules import default_candidates, explicit_ruleset
    from captum_relp.embedded import load_embedded
    from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs

    model, tok = load_embedded("tiny-gpt2-ioi")
    batch = encode_ioi(generate_ioi_pairs(6, seed=3, tokenizer=tok, templates=[0]), tok)
    layers, flags, _ = model_components(model).select(("mlp",))
    kwargs = dict(baselines=batch.corrupt_ids, metric=batch.metric(), attribute_to_layer_input=flags,
                  additional_forward_args={"attention_mask": batch.attention_mask})
    scores = score_candidates(model, layers, batch.clean_ids, **kwargs)
    data = scores.data["mlp"]
    ap = torch.cat([a.double() for a in LayerActivationPatching(model, layers).attribute(batch.clean_ids, **kwargs)], 1)
    assert torch.allclose(data.reference, ap.reshape(ap.shape[0], -1), atol=1e-12)
    for candidate in default_candidates(model):
        relp = LayerRelevancePatching(model, layers, rules=explicit_ruleset(candidate)).attribute(
            batch.clean_ids, **kwargs)
        mine = torch.cat([r.sum(-1).double() for r in relp], 1)
        assert torch.allclose(data.scores[candidate.name], mine, atol=1e-12), candidate.name
    agreement = choose_rules(scores, n_bootstrap=50).agreement["mlp"]
    assert sorted(agreement) == sorted(c.name for c in default_candidates(model))
    keep = data.mask
    for name, value in agreement.items():
        x, y = data.scores[name][keep], data.reference[keep]
        assert abs(value - float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 1e-9, name


def test_no_calibration_pairs_is_an_error_naming_the_inputs():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    empty = torch.zeros(0, 3, 4)
    with pytest.raises(ValueError, match="inputs: no calibration pairs"):
        calibrate_rules(net, [net[0]], empty, empty, metric=lambda out: out[:, -1, 0])
