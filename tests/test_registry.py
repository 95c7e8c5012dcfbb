"""Rule registry, presets, strict mode, and forward outputs unchanged per family."""
import pytest
import torch
from tests.conftest import FAMILIES, build_model, model_state, token_pair

from captum_relp import (
    PRESETS,
    RuleSet,
    UnsupportedModuleError,
    apply_rules,
    register_rule,
    unregister_rule,
)
from captum_relp.rules import registered_rules, resolve_rules
from captum_relp.rules import IdentityRule, LayerNormRule, RMSNormRule


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_forward_unchanged_under_every_preset(family, preset, attn):
    model = build_model(family, attn_implementation=attn)
    clean, _ = token_pair(batch=2, seq=6)
    mask = torch.ones_like(clean)
    mask[1, 4:] = 0  # right padding: a dropped mask would change row 1's logits
    with torch.no_grad():
        reference = model(clean, attention_mask=mask).logits
    before = model_state(model)
    with torch.enable_grad(), apply_rules(model, preset):
        ruled = model(clean, attention_mask=mask).logits
    assert torch.equal(ruled, reference)
    assert model_state(model) == before


def test_rules_cover_every_family(family):
    model = build_model(family)
    assert RuleSet().uncovered(model) == []


def test_presets_apply_expected_rules():
    llama = build_model("llama")
    rules = RuleSet()
    assert isinstance(rules.rule_for(llama.model.norm), LayerNormRule)
    assert rules.rule_for(llama.model.norm).centered is False
    assert type(rules.rule_for(llama.model.layers[0].mlp)).__name__ == "HalfRule"
    assert isinstance(rules.rule_for(llama.model.layers[0].mlp.act_fn), IdentityRule)
    gemma = build_model("gemma2")
    assert rules.rule_for(gemma.model.norm).weight_offset == 1.0
    assert resolve_rules("none").rule_for(llama.model.norm) is None
    assert resolve_rules("relp-ah").attention is not None and resolve_rules("relp").attention is None


class _OddNorm(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * x / x.norm(dim=-1, keepdim=True)


def _odd_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), _OddNorm(4), torch.nn.Linear(4, 2))


def test_strict_mode_names_module_and_type_and_leaves_model_untouched():
    model = _odd_model()
    before = model_state(model)
    with pytest.raises(UnsupportedModuleError, match=r"1 \(_OddNorm\).*register_rule"):
        with apply_rules(model, "relp"):
            pass
    assert model_state(model) == before


def test_non_strict_mode_warns():
    with pytest.warns(UserWarning, match="_OddNorm"):
        with apply_rules(_odd_model(), "relp", strict=False):
            pass


def test_register_and_unregister_custom_rule():
    model = _odd_model()
    register_rule(_OddNorm, RMSNormRule())
    try:
        assert registered_rules()[f"{_OddNorm.__module__}._OddNorm"][0] == "norm"
        with apply_rules(model, "relp"):
            assert "forward" in model[1].__dict__
        assert "forward" not in model[1].__dict__
    finally:
        unregister_rule(_OddNorm)
    with pytest.raises(UnsupportedModuleError):
        with apply_rules(model, "relp"):
            pass


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="rules must be one of"):
        resolve_rules("lrp-magic")


def test_rules_undone_when_body_raises():
    model = build_model("llama")
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_rules(model, "relp-ah"):
            raise RuntimeError("boom")
    assert model_state(model) == before
    assert FAMILIES


def test_name_map_pattern_matching_nothing_is_named():
    model = build_model("gpt2")
    rules = RuleSet("typo", name_map={"lm_head": None, "transformer.h.*.mlp.c_fcc": IdentityRule()})
    with pytest.raises(ValueError, match=r"name_map pattern\(s\) \['transformer.h.\*.mlp.c_fcc'\] match no module"):
        with apply_rules(model, rules):
            pass
    assert model_state(model)["forward_patches"] == []
    with apply_rules(model, RuleSet("ok", name_map={"lm_head": None, "transformer.h.*.mlp.act": IdentityRule()})):
        assert "forward" in model.transformer.h[1].mlp.act.__dict__


def test_override_of_a_type_the_model_lacks_is_named():
    from captum_relp import LayerRelevancePatching
    from captum_relp.calibration import explicit_ruleset
    from captum_relp.rules import type_key

    model = build_model("gpt2")
    before = model_state(model)
    rules = RuleSet("typo", overrides={"torch.nn.modules.activation.GELU": IdentityRule()})
    with pytest.raises(ValueError) as error:
        with apply_rules(model, rules):
            pass
    message = str(error.value)
    assert "'torch.nn.modules.activation.GELU'" in message
    listed = message.split("its module types with rules: ")[1]
    assert listed.startswith("['torch.nn.modules.linear.Linear', 'torch.nn.modules.normalization.LayerNorm', "
                             "'transformers.activations.NewGELUActivation', 'transformers.pytorch_utils.Conv1D']")
    assert model_state(model) == before
    clean, corrupt = token_pair()
    with pytest.raises(ValueError, match="torch.nn.modules.activation.GELU"):
        LayerRelevancePatching(model, model.transformer.h[0], rules=rules).attribute(
            clean, baselines=corrupt, target=3)
    act = type(model.transformer.h[0].mlp.act)
    for key in (type_key(act), act):  # by qualified name, or by the class itself
        with apply_rules(model, RuleSet("ok", overrides={key: IdentityRule()})):
            assert "forward" in model.transformer.h[1].mlp.act.__dict__
    with apply_rules(model, explicit_ruleset(RuleSet("ln", categories=("norm",)))):
        pass  # the 0-rule that spells out a disabled category is no override of a missing type


def test_rules_declare_their_category():
    from captum_relp.rules import AHRule, EpsilonRule, GammaRule, HalfRule
    from captum_relp.rules.hookpoint import DetachHookRule, HookIdentityRule

    rules = [LayerNormRule(), RMSNormRule(), IdentityRule(), HalfRule(), EpsilonRule(), GammaRule(), AHRule(),
             DetachHookRule("hook_scale"), DetachHookRule("hook_pattern"), HookIdentityRule()]
    assert [r.category for r in rules] == ["norm", "norm", "activation", "gate", "linear", "linear", "custom",
                                           "norm", "attention", "custom"]
    register_rule(_OddNorm, GammaRule())
    try:
        assert registered_rules()[f"{_OddNorm.__module__}._OddNorm"][0] == "linear"
    finally:
        unregister_rule(_OddNorm)


def test_shared_guard_runs_the_original_forward():
    """ForwardPatchRule's guard: extra arguments, no gradient mode or an input without gradient run the
    original forward; the rule's own patched_forward sees only a single input that needs the rule."""
    from captum_relp.rules import ForwardPatchRule

    calls = []

    class Recording(ForwardPatchRule):
        def patched_forward(self, module, original, state, x):
            calls.append(x.requires_grad)
            return original(x)

    class Scale(torch.nn.Module):
        def forward(self, x, factor=1.0):
            return x * factor

    module = Scale()
    undo = Recording().apply(module)
    try:
        x = torch.ones(2, requires_grad=True)
        assert torch.equal(module(x, 3.0), 3 * x) and torch.equal(module(x, factor=2.0), 2 * x)
        with torch.no_grad():
            module(x)
        module(torch.ones(2))
        assert calls == []
        module(x)
        assert calls == [True]
    finally:
        undo()


def test_one_rules_protocol():
    """A preset name, a RuleSet and CalibratedRules all answer plan(model, layers, flags); only a
    single rule set is accepted where one applies to the whole model."""
    from captum_relp import CalibratedRules
    from captum_relp.rules import RulePlan, rule_plan

    model = build_model("gpt2")
    layers = [model.transformer.h[0].mlp, model.transformer.h[1].attn.c_proj]
    calibrated = CalibratedRules({"relp": RuleSet("relp"), "none": RuleSet("none", categories=())},
                                 {"mlp": "relp", "attn": "none"}, {}, ["mlp", "attn"], auto_groups=False)
    for rules in ("relp", RuleSet("relp"), calibrated):
        assert isinstance(rule_plan(rules), RulePlan)
    assert [(r.name, i) for r, i in rule_plan("relp").plan(model, layers, [False, False])] == [("relp", [0, 1])]
    assert [(r.name, i) for r, i in calibrated.plan(model, layers, [False, False])] == [("relp", [0]), ("none", [1])]
    with pytest.raises(ValueError, match="CalibratedRules chooses a rule set per attributed layer"):
        resolve_rules(calibrated)
