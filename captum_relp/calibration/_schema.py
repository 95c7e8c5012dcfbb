"""The JSON file of :class:`~captum_relp.CalibratedRules`: a versioned, validated schema.

Every field is checked on load; a bad field raises a ``ValueError`` that names it (e.g.
``candidates['ln'].categories[0]``). Rules are stored by the class name of a rule of
:mod:`captum_relp.rules` and its parameters; the model the rules were calibrated on is
recorded (:func:`model_signature`) so that loading against another model raises.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Dict, List, Optional

from torch import nn

from .. import rules as _rules_module
from ..rules import Rule, RuleSet, type_key
from ..rules.registry import registered_category

FORMAT_VERSION = 1
RULE_CATEGORIES = ("norm", "activation", "gate", "custom")
_SIGNATURE_CATEGORIES = RULE_CATEGORIES + ("attention",)
_RULESET_KEYS = ("name", "categories", "attention", "linear", "overrides", "name_map")
_REQUIRED = ("version", "candidates", "choices", "agreement", "groups", "auto_groups", "score", "n_examples")
_OPTIONAL = ("info", "default", "confidence", "n_bootstrap", "selection", "model")
DECISIONS = ("default", "chosen", "undecided", "no-effect")
"""How a group's rule set was decided (see :mod:`captum_relp.calibration._select`)."""
_SELECTION_KEYS = ("choice", "decision", "note", "agreement", "interval", "margin", "margin_interval")


def _fail(where: str, message: str) -> None:
    raise ValueError(f"calibrated rules: field {where}: {message}")


def _expect(value: Any, kinds: Any, where: str, what: str) -> Any:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        _fail(where, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _as_tuple(kinds: Any) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def model_signature(model: Optional[nn.Module]) -> Optional[Dict[str, Any]]:
    """What a calibration file records of its model: the root type and the ruled module types.

    Example:
        >>> import torch
        >>> model_signature(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU()))["module_types"]
        ['torch.nn.modules.activation.GELU']
    """
    if model is None:
        return None
    types = {type_key(type(m)) for m in model.modules() if registered_category(type(m)) in _SIGNATURE_CATEGORIES}
    return {"type": type_key(type(model)), "module_types": sorted(types)}


def check_model(signature: Optional[Dict[str, Any]], candidates: Dict[str, RuleSet], model: nn.Module) -> None:
    """Raise if ``model`` is not the kind of model the rules were calibrated on.

    The root type and the set of module types that rules apply to must match, every
    ``name_map`` pattern of a candidate must match a module of ``model``, and every type a
    candidate overrides must be one of its module types (``RuleSet.check_overrides``).
    """
    if signature is not None:
        found = model_signature(model)
        if found["type"] != signature["type"]:
            raise ValueError(f"these rules were calibrated on a {signature['type']}, not a {found['type']}")
        missing = sorted(set(signature["module_types"]) - set(found["module_types"]))
        extra = sorted(set(found["module_types"]) - set(signature["module_types"]))
        if missing or extra:
            raise ValueError(f"the model's modules do not match the calibrated rules: missing {missing}, "
                             f"not calibrated {extra}")
    paths = [path for path, _ in model.named_modules()]
    for name, ruleset in candidates.items():
        for pattern in ruleset.name_map:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise ValueError(f"candidate {name!r}: name_map pattern {pattern!r} matches no module of the model")
        ruleset.check_overrides(model)


def rule_to_dict(rule: Optional[Rule]) -> Optional[Dict[str, Any]]:
    """``{"type": class name, "params": {...}}`` for a rule of :mod:`captum_relp.rules`."""
    if rule is None:
        return None
    name = type(rule).__name__
    if getattr(_rules_module, name, None) is not type(rule):
        raise ValueError(f"cannot save {rule!r}: only the rules of captum_relp.rules are serialisable")
    return {"type": name, "params": dict(vars(rule))}


def rule_from_dict(data: Any, where: str) -> Optional[Rule]:
    """Inverse of :func:`rule_to_dict`; parameters must be the rule's own, with their types."""
    if data is None:
        return None
    _expect(data, dict, where, "a rule object or null")
    if set(data) != {"type", "params"}:
        _fail(where, f"a rule has exactly the keys 'type' and 'params', got {sorted(data)}")
    names = [n for n in _rules_module.__all__ if isinstance(getattr(_rules_module, n), type)
             and issubclass(getattr(_rules_module, n), Rule)]
    if not (isinstance(data["type"], str) and data["type"] in names):
        _fail(where + ".type", f"unknown rule {data['type']!r} (rules: {', '.join(names)})")
    cls = getattr(_rules_module, data["type"])
    defaults = vars(cls())
    params = _expect(data["params"], dict, where + ".params", "an object")
    if set(params) != set(defaults):
        _fail(where + ".params", f"{cls.__name__} takes {sorted(defaults)}, got {sorted(params)}")
    for key, value in params.items():
        if defaults[key] is None and value is None:
            continue  # an optional parameter left unset
        kinds = bool if isinstance(defaults[key], bool) else (int, float)
        _expect(value, kinds, f"{where}.params.{key}", kinds.__name__ if kinds is bool else "a number")
    rule = cls.__new__(cls)
    rule.__dict__.update(params)
    return rule


def ruleset_to_dict(ruleset: RuleSet) -> Dict[str, Any]:
    """A candidate rule set as JSON-ready data (``name_map`` included)."""
    return {"name": ruleset.name, "categories": list(ruleset.categories),
            "attention": rule_to_dict(ruleset.attention), "linear": rule_to_dict(ruleset.linear),
            "overrides": {k: rule_to_dict(r) for k, r in ruleset.overrides.items()},
            "name_map": {k: rule_to_dict(r) for k, r in ruleset.name_map.items()}}


def ruleset_from_dict(data: Any, where: str) -> RuleSet:
    """Inverse of :func:`ruleset_to_dict`, validating every field."""
    _expect(data, dict, where, "a rule set object")
    if set(data) != set(_RULESET_KEYS):
        _fail(where, f"a rule set has the keys {list(_RULESET_KEYS)}, got {sorted(data)}")
    _expect(data["name"], str, where + ".name", "a string")
    categories = _expect(data["categories"], list, where + ".categories", "a list")
    for i, category in enumerate(categories):
        if category not in RULE_CATEGORIES:
            _fail(f"{where}.categories[{i}]", f"unknown category {category!r} (categories: {list(RULE_CATEGORIES)})")
    overrides = _expect(data["overrides"], dict, where + ".overrides", "an object")
    name_map = _expect(data["name_map"], dict, where + ".name_map", "an object")
    parsed_overrides = {}
    for key, rule in overrides.items():
        parsed_overrides[key] = rule_from_dict(rule, f"{where}.overrides[{key!r}]")
        if parsed_overrides[key] is None:
            _fail(f"{where}.overrides[{key!r}]", "an override needs a rule")
    return RuleSet(data["name"], tuple(categories), rule_from_dict(data["attention"], where + ".attention"),
                   rule_from_dict(data["linear"], where + ".linear"), parsed_overrides,
                   {k: rule_from_dict(r, f"{where}.name_map[{k!r}]") for k, r in name_map.items()})


def _number_or_null(value: Any, where: str) -> None:
    if value is not None:
        _expect(value, (int, float), where, "a number or null")
        if not math.isfinite(value):
            _fail(where, f"expected a finite number or null, got {value!r}")


def _interval_or_null(value: Any, where: str) -> None:
    if value is not None:
        _expect(value, list, where, "[low, high] or null")
        if len(value) != 2:
            _fail(where, f"expected [low, high], got {value!r}")
        for i, v in enumerate(value):
            _number_or_null(v, f"{where}[{i}]")


def _check_per_candidate(table: Any, names: List[str], where: str, check) -> None:
    _expect(table, dict, where, "an object")
    for name, value in table.items():
        if name not in names:
            _fail(f"{where}[{name!r}]", f"unknown candidate {name!r} (candidates: {names})")
        check(value, f"{where}[{name!r}]")


def _check_version(version: Any) -> None:
    """Raise unless ``version`` is :data:`FORMAT_VERSION`; a newer file says to upgrade.

    Example:
        >>> _check_version(FORMAT_VERSION + 1)
        Traceback (most recent call last):
        ...
        ValueError: calibrated rules: field version: the file has format version 2, written by a newer captum-relp; this captum-relp reads format version 1: upgrade captum-relp (pip install --upgrade captum-relp) to read it
    """
    if version == FORMAT_VERSION and not isinstance(version, bool):
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        _fail("version", f"the file has format version {version}, written by a newer captum-relp; this "
              f"captum-relp reads format version {FORMAT_VERSION}: upgrade captum-relp "
              "(pip install --upgrade captum-relp) to read it")
    _fail("version", f"unsupported format version {version!r} (this captum-relp reads format version "
          f"{FORMAT_VERSION})")


def validate(data: Any, scores: tuple) -> Dict[str, Any]:
    """Check a parsed file; returns the constructor arguments of ``CalibratedRules``."""
    _expect(data, dict, "<root>", "an object")
    if not {"candidates", "choices"} & set(data):
        _fail("<root>", "not a calibration file: it has neither 'candidates' nor 'choices' (a calibration file "
              "is the *_calibration.json a calibrated run writes, or CalibratedRules.save)")
    for key in _REQUIRED:
        if key not in data:
            _fail(key, "missing" + (" (a file written before versioned calibration files: recalibrate)"
                                    if key == "version" else ""))
    for key in data:
        if key not in _REQUIRED + _OPTIONAL:
            _fail(key, f"unknown field (fields: {list(_REQUIRED + _OPTIONAL)})")
    _check_version(data["version"])
    if data["score"] not in scores:
        _fail("score", f"unknown score {data['score']!r} (scores: {list(scores)})")
    _expect(data["auto_groups"], bool, "auto_groups", "true or false")
    _expect(data["n_examples"], int, "n_examples", "an integer")
    raw = _expect(data["candidates"], dict, "candidates", "an object")
    if not raw:
        _fail("candidates", "no candidates")
    candidates = {}
    for name, value in raw.items():
        candidates[name] = ruleset_from_dict(value, f"candidates[{name!r}]")
        if candidates[name].name != name:
            _fail(f"candidates[{name!r}].name", f"the candidate is stored under {name!r} but named "
                  f"{candidates[name].name!r}")
    names = list(candidates)
    groups = _expect(data["groups"], list, "groups", "a list")
    choices = _expect(data["choices"], dict, "choices", "an object")
    for i, group in enumerate(groups):
        _expect(group, str, f"groups[{i}]", "a string")
        if group not in choices:
            _fail(f"groups[{i}]", f"group {group!r} has no entry in choices")
    for group, name in choices.items():
        if group not in groups:
            _fail(f"choices[{group!r}]", f"group {group!r} is not in groups {sorted(set(groups))}")
        if name not in names:
            _fail(f"choices[{group!r}]", f"unknown candidate {name!r} (candidates: {names})")
    for key in ("agreement", "selection"):
        table = _expect(data.get(key, {}), dict, key, "an object")
        for group, row in table.items():
            if group not in choices:
                _fail(f"{key}[{group!r}]", f"group {group!r} is not in choices")
            if key == "agreement":
                _check_per_candidate(row, names, f"agreement[{group!r}]", _number_or_null)
            else:
                _check_selection(row, names, choices[group], f"selection[{group!r}]")
    if data.get("default") not in (None, "best-preset") and data["default"] not in names:
        _fail("default", f"unknown candidate {data['default']!r} (candidates: {names})")
    _number_or_null(data.get("confidence"), "confidence")
    if data.get("n_bootstrap") is not None:
        _expect(data["n_bootstrap"], int, "n_bootstrap", "an integer")
    _check_signature(data.get("model"))
    _expect(data.get("info", {}), dict, "info", "an object")
    out = {k: v for k, v in data.items() if k != "version"}
    out["candidates"] = candidates
    return out


def _check_selection(row: Any, names: List[str], choice: str, where: str) -> None:
    _expect(row, dict, where, "an object")
    if set(row) != set(_SELECTION_KEYS):
        _fail(where, f"a selection has the keys {list(_SELECTION_KEYS)}, got {sorted(row)}")
    if row["choice"] != choice:
        _fail(where + ".choice", f"{row['choice']!r} differs from choices: {choice!r}")
    if row["decision"] not in DECISIONS:
        _fail(where + ".decision", f"unknown decision {row['decision']!r} (decisions: {list(DECISIONS)})")
    _expect(row["note"], str, where + ".note", "a string")
    for key in ("agreement", "margin"):
        _check_per_candidate(row[key], names, f"{where}.{key}", _number_or_null)
    for key in ("interval", "margin_interval"):
        _check_per_candidate(row[key], names, f"{where}.{key}", _interval_or_null)


def _check_signature(signature: Any) -> None:
    if signature is None:
        return
    _expect(signature, dict, "model", "an object or null")
    if set(signature) != {"type", "module_types"}:
        _fail("model", f"expected the keys ['module_types', 'type'], got {sorted(signature)}")
    _expect(signature["type"], str, "model.type", "a string")
    for i, t in enumerate(_expect(signature["module_types"], list, "model.module_types", "a list")):
        _expect(t, str, f"model.module_types[{i}]", "a string")
