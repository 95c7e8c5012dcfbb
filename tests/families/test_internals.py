"""The library uses no private transformers attribute beyond those the family table records, and
each recorded one still works on the installed release."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch
import transformers

from captum_relp.families import TRANSFORMERS_INTERNALS

PACKAGE = Path(__file__).resolve().parents[2] / "captum_relp"

OTHER_LIBRARIES = {  # private names of other libraries, each for a stated reason
    "_orig_mod": "torch.compile's wrapped module (the hooked module of a compiled model)",
    "_old_forward": "accelerate's wrapped forward (rules patch it inside accelerate's hooks)",
    "_hf_hook": "accelerate's hook marker",
    "_module": "nnsight's Envoy: the module it wraps (models handed out by nnsight are unwrapped)",
    "_utils": "captum._utils: captum's tuple-of-tensors helpers, which captum's own extensions use",
    "_forward_hooks": "torch.nn.Module's hook dict, read in a docstring example",
    "_suptitle": "matplotlib's figure title, read in a docstring example",
}


def _own_names() -> set:
    """Private names the package defines itself: functions, classes, attributes, module files."""
    names = {path.stem for path in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)  # the package's own attributes (not config._x = ...)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[-1])
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _private_attributes() -> dict:
    """``{name: [file:line, ...]}`` of every ``obj._name`` read in code or docstring examples."""
    found: dict = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for lineno, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            for name in re.findall(r"(?<=[\w\]\)])\.(_[a-z]\w*)|getattr\([^,]+, \"(_[a-z]\w*)\"", code):
                for attr in filter(None, name if isinstance(name, tuple) else (name,)):
                    found.setdefault(attr, []).append(f"{path.relative_to(PACKAGE.parent)}:{lineno}")
    return found


def test_no_private_transformers_attribute_beyond_the_recorded_ones():
    recorded = {key.split(".")[-1] for key in TRANSFORMERS_INTERNALS}
    allowed = _own_names() | recorded | set(OTHER_LIBRARIES)
    unknown = {name: where for name, where in _private_attributes().items() if name not in allowed}
    assert not unknown, (
        f"private attributes of another library are used: {unknown}. Compute from public "
        f"parameters and configs, or record the internal in captum_relp/families/table.py "
        f"(TRANSFORMERS_INTERNALS) with a test here")


def test_the_scan_finds_a_private_method():
    assert "_attn_implementation" in _private_attributes()  # the scan sees the recorded one


def test_every_recorded_internal_exists():
    for key, use in TRANSFORMERS_INTERNALS.items():
        owner, name = key.split(".")
        assert hasattr(getattr(transformers, owner), name), (
            f"transformers {transformers.__version__} has no {key}, which captum-relp uses for: {use}")


def test_recorded_attention_implementation_switch_still_works():
    """``config._attn_implementation`` names the function the model calls, and can be set."""
    key = "PretrainedConfig._attn_implementation"
    assert key in TRANSFORMERS_INTERNALS
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    model = transformers.GPT2LMHeadModel(config).eval()
    calls = []

    def spy(module, query, key_, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key_, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("relp_test_spy", spy)
    transformers.masking_utils.AttentionMaskInterface.register(
        "relp_test_spy", transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    message = (f"transformers {transformers.__version__} changed {key}, which captum-relp uses for "
               f"{TRANSFORMERS_INTERNALS[key]}: the AH-rule must be rebuilt on this release")
    assert getattr(model.config, "_attn_implementation", None) is not None, message
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        reference = model(ids).logits
        original = model.config._attn_implementation
        model.config._attn_implementation = "relp_test_spy"
        try:
            switched = model(ids).logits
        finally:
            model.config._attn_implementation = original
    assert calls, message
    assert torch.allclose(switched, reference, atol=1e-6), message
