"""Calibration files that cannot lie: faithful round trip, validated schema, model check."""
import copy
import json
import warnings

import pytest
import torch
from tests.conftest import build_model, token_pair
from tests.test_calibration import metric, two_branch_case

from captum_relp import CalibratedRules, LayerRelevancePatching, RuleSet, calibrate_rules, model_components
from captum_relp.rules import EpsilonRule, LayerNormRule


def name_map_calibration():
    net, clean, corrupt = two_branch_case()
    candidates = [RuleSet("gradient", categories=()),
                  RuleSet("mapped", categories=("activation",), name_map={"ln": LayerNormRule(weight_offset=0.5),
                                                                          "read_b": EpsilonRule(0.01)})]
    cal = calibrate_rules(net, [net.a, net.b], clean, corrupt, metric=metric, groups=["tanh", "ln"],
                          candidates=candidates)
    return net, clean, corrupt, cal


def test_round_trip_is_faithful_with_name_map(tmp_path):
    net, clean, corrupt, cal = name_map_calibration()
    path = tmp_path / "rules.json"
    cal.save(path)
    loaded = CalibratedRules.load(path, model=net)
    # every field, name_map included (rules compare by their repr: type and parameters)
    assert repr(loaded.candidates) == repr(cal.candidates)
    assert {k: v for k, v in vars(loaded).items() if k != "candidates"} == \
        {k: v for k, v in vars(cal).items() if k != "candidates"}
    assert repr(loaded.candidates["mapped"].name_map) == repr({"ln": LayerNormRule(weight_offset=0.5),
                                                               "read_b": EpsilonRule(0.01)})
    assert loaded.to_json() == cal.to_json()
    kwargs = dict(baselines=corrupt, metric=metric)
    first = LayerRelevancePatching(net, [net.a, net.b], rules=cal).attribute(clean, **kwargs)
    second = LayerRelevancePatching(net, [net.a, net.b], rules=loaded).attribute(clean, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_name_map_survives_to_json():
    mapped = RuleSet("mapped", name_map={"*.ln": LayerNormRule(weight_offset=0.5), "lm_head": None})
    cal = CalibratedRules({"mapped": mapped}, {"mlp": "mapped"}, {"mlp": {"mapped": 0.5}}, ["mlp"])
    loaded = CalibratedRules.from_json(cal.to_json())
    assert repr(loaded.candidates["mapped"].name_map) == repr(mapped.name_map)


def _edit(data, path, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value


BAD_FILES = [  # (edit, the field the error must name)
    ((("candidates", "mapped", "categories", 0), "nrom"), "candidates['mapped'].categories[0]"),
    ((("candidates", "mapped", "name_map", "ln", "type"), "LNRule"), "candidates['mapped'].name_map['ln'].type"),
    ((("candidates", "mapped", "name_map", "ln", "params", "weight_offset"), "0.5"),
     "candidates['mapped'].name_map['ln'].params.weight_offset"),
    ((("candidates", "mapped", "name_map", "ln", "params", "epsilon"), 0.1), "candidates['mapped'].name_map['ln'].params"),
    ((("candidates", "mapped", "linear"), {"type": "os.system", "params": {}}), "candidates['mapped'].linear.type"),
    ((("choices", "tanh"), "relp"), "choices['tanh']"),
    ((("choices", "mlp"), "gradient"), "choices['mlp']"),
    ((("groups", 0), "attn"), "groups[0]"),
    ((("agreement", "ln", "gradient"), "high"), "agreement['ln']['gradient']"),
    ((("score",), "kendall"), "score"),
    ((("version",), 2), "version"),
    ((("version",), KeyError), "version"),
    ((("auto_groups",), "yes"), "auto_groups"),
    ((("extra",), 1), "extra"),
    ((("candidates", "mapped", "name"), "other"), "candidates['mapped'].name"),
    ((("selection", "tanh", "interval", "gradient"), [0.1]), "selection['tanh'].interval['gradient']"),
    ((("model", "module_types"), "x"), "model.module_types"),
]


@pytest.mark.parametrize("edit,field", BAD_FILES, ids=[f for _, f in BAD_FILES])
def test_a_bad_field_raises_naming_it(tmp_path, edit, field):
    _, _, _, cal = name_map_calibration()
    data = json.loads(cal.to_json())
    _edit(data, *edit)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        CalibratedRules.load(path)
    assert f"field {field}" in str(error.value) and str(path) in str(error.value)


def test_a_newer_file_names_both_versions_and_says_to_upgrade(tmp_path):
    from captum_relp.calibration._schema import FORMAT_VERSION

    _, _, _, cal = name_map_calibration()
    data = json.loads(cal.to_json())
    data["version"] = FORMAT_VERSION + 1
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        CalibratedRules.load(path)
    message = str(error.value)
    assert f"format version {FORMAT_VERSION + 1}" in message and f"format version {FORMAT_VERSION}" in message
    assert "newer captum-relp" in message and "upgrade captum-relp" in message and str(path) in message


def test_not_json_and_nan_raise():
    with pytest.raises(ValueError, match="not valid JSON"):
        CalibratedRules.from_json("{")
    _, _, _, cal = name_map_calibration()
    text = cal.to_json().replace('"n_examples": 3', '"n_examples": 3.5')
    with pytest.raises(ValueError, match="field n_examples"):
        CalibratedRules.from_json(text)
    data = json.loads(cal.to_json())
    data["agreement"]["tanh"]["gradient"] = float("nan")
    with pytest.raises(ValueError, match=r"field agreement\['tanh'\]\['gradient'\]: expected a finite"):
        CalibratedRules.from_json(json.dumps(data))


def test_loading_against_another_model_raises(tmp_path):
    llama, gpt2 = build_model("llama"), build_model("gpt2")
    clean, corrupt = token_pair(batch=3, seq=5)
    layers, flags, _ = model_components(llama).select(["mlp"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibrate_rules(llama, layers, clean, corrupt, attribute_to_layer_input=flags, n_bootstrap=20,
                              metric=lambda out: out[:, -1, 1] - out[:, -1, 2],
                              candidates=[RuleSet("gradient", categories=()), RuleSet("relp")])
    path = tmp_path / "llama.json"
    cal.save(path)
    CalibratedRules.load(path, model=build_model("llama", seed=1))  # same architecture, other weights: fine
    with pytest.raises(ValueError, match="calibrated on a transformers.models.llama.*not a .*GPT2LMHeadModel"):
        CalibratedRules.load(path, model=gpt2)
    gpt2_layers, gpt2_flags, _ = model_components(gpt2).select(["mlp"])
    with pytest.raises(ValueError, match="calibrated on a"):
        LayerRelevancePatching(gpt2, gpt2_layers, rules=cal).attribute(
            clean, baselines=corrupt, attribute_to_layer_input=gpt2_flags, metric=lambda out: out[:, -1, 1])
    # same root class, other module types (LayerNorm instead of RMSNorm) also raises
    data = json.loads(cal.to_json())
    data["model"]["module_types"] = ["torch.nn.modules.normalization.LayerNorm"]
    with pytest.raises(ValueError, match="modules do not match"):
        CalibratedRules.from_json(json.dumps(data), model=llama)


def test_a_name_map_pattern_that_matches_nothing_raises():
    net, _, _, cal = name_map_calibration()
    cal.candidates["mapped"].name_map["no_such_module.*"] = None
    with pytest.raises(ValueError, match="name_map pattern 'no_such_module.*' matches no module"):
        CalibratedRules.from_json(cal.to_json(), model=net)


def test_another_json_file_is_named_as_not_a_calibration_file():
    """A results JSON passed by mistake is not blamed on an old file format."""
    with pytest.raises(ValueError, match="not a calibration file") as error:
        CalibratedRules.from_json(json.dumps({"config": {}, "pcc_per_prompt": {}}))
    assert "before versioned" not in str(error.value)
