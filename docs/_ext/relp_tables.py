"""Sphinx extension: write the rule-reference tables from the live registry.

At ``builder-inited`` it writes Markdown fragments into ``docs/_generated/``,
which ``rules.md`` includes. The tables come from
:func:`captum_relp.rules.registered_rules`, :data:`captum_relp.PRESETS` and
tiny randomly initialised Hugging Face models built from configs, so the docs
cannot drift from the code.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

GENERATED = "_generated"


def _tiny_models() -> "OrderedDict[str, Tuple[str, Callable]]":
    import transformers as T

    small = dict(vocab_size=32, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
                 pad_token_id=0)
    decoder = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                   **small)
    gpt2 = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0,
                eos_token_id=0)
    return OrderedDict([
        ("GPT-2", ("GPT2Config(n_layer=1, n_embd=16, n_head=2)",
                   lambda: T.GPT2LMHeadModel(T.GPT2Config(**gpt2)))),
        ("GPT-NeoX / Pythia", ("GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, ...)",
                               lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**decoder)))),
        ("Llama", ("LlamaConfig(num_hidden_layers=1, hidden_size=16, ...)",
                   lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **decoder)))),
        ("Qwen2", ("Qwen2Config(num_hidden_layers=1, hidden_size=16, ...)",
                   lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **decoder)))),
        ("Gemma2", ("Gemma2Config(num_hidden_layers=1, hidden_size=16, ...)",
                    lambda: T.Gemma2ForCausalLM(
                        T.Gemma2Config(num_key_value_heads=2, head_dim=8, **decoder)))),
        ("Qwen3", ("Qwen3Config(num_hidden_layers=1, hidden_size=16, head_dim=8, ...)",
                   lambda: T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=8, **decoder)))),
        ("Gemma3", ("Gemma3TextConfig(num_hidden_layers=1, hidden_size=16, head_dim=8, ...)",
                    lambda: T.Gemma3ForCausalLM(
                        T.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **decoder)))),
        ("BERT", ("BertConfig(num_hidden_layers=1, hidden_size=16, ...)",
                  lambda: T.BertForMaskedLM(T.BertConfig(**decoder)))),
    ])


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _code(text: str) -> str:
    return f"`{text}`"


def registry_table() -> str:
    from captum_relp.rules.registry import registered_rules

    rows = []
    for key, (category, rule) in sorted(registered_rules().items(), key=lambda kv: (kv[1][0], kv[0])):
        module, name = key.rsplit(".", 1)
        rows.append([_code(name), _code(module), category, _code(rule)])
    return _md_table(["Class", "Module", "Category", "Rule"], rows)


def presets_table() -> str:
    from captum_relp import PRESETS

    rows = []
    for name, factory in PRESETS.items():
        ruleset = factory()
        cats = ", ".join(ruleset.categories) or "(none)"
        attention = repr(ruleset.attention) if ruleset.attention is not None else "(softmax gradient)"
        linear = repr(ruleset.linear) if ruleset.linear is not None else "0-rule (plain gradient)"
        rows.append([_code(repr(name)), cats, _code(attention), linear])
    return _md_table(["Preset", "Registry categories applied", "Attention", "Linear layers"], rows)


def _rule_text(ruleset, module) -> Tuple[str, str]:
    from captum_relp.rules.registry import needs_rule, registered_category, type_key

    key = type_key(type(module))
    category = registered_category(key) or ""
    rule = ruleset.rule_for(module)
    if rule is not None:
        return category, _code(repr(rule))
    if category == "linear":
        return category, "0-rule (plain gradient)"
    if needs_rule(module):
        return category or "?", "**no rule** (strict mode raises `UnsupportedModuleError`)"
    return category or "—", "no rule needed"


def family_tables() -> str:
    import torch
    from captum_relp import PRESETS
    from captum_relp.families import gradient_paths
    from captum_relp.rules.registry import needs_rule, registered_category, type_key

    ruleset = PRESETS["relp"]()
    chunks = []
    torch.manual_seed(0)
    for family, (config_text, build) in _tiny_models().items():
        with contextlib.redirect_stderr(io.StringIO()):
            model = build()
        counts: "OrderedDict[str, int]" = OrderedDict()
        examples: Dict[str, object] = {}
        plain = gradient_paths(model)
        for path, module in model.named_modules():
            key = type_key(type(module)) + (" (query/key norm)" if path in plain else "")
            is_leaf = not any(True for _ in module.children())
            relevant = (is_leaf or registered_category(key) is not None or needs_rule(module)
                        or type(module).__name__.endswith("Attention"))
            if not relevant:
                continue
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, module)
        rows = []
        for key, count in counts.items():
            module = examples[key]
            if key.endswith(" (query/key norm)"):
                category, rule = "norm", "plain gradient (the scores are scale invariant in its input)"
            elif type(module).__name__.endswith("Attention") and registered_category(key) is None:
                category, rule = "attention", "softmax gradient (AH-rule under `\"relp-ah\"`)"
            else:
                category, rule = _rule_text(ruleset, module)
            module_path, name = key.split(" ")[0].rsplit(".", 1)
            name += key[len(key.split(" ")[0]):]
            rows.append([_code(name), _code(module_path), str(count), category, rule])
        chunks.append(f"### {family}\n\nBuilt from `{config_text}` "
                      f"({type(model).__name__}, random weights).\n\n"
                      + _md_table(["Class", "Module", "Count", "Category", 'Rule under `"relp"`'], rows))
    return "\n".join(chunks)


def _write(path: str, text: str) -> None:
    header = "<!-- generated at build time by docs/_ext/relp_tables.py: do not edit -->\n\n"
    text = header + text
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def generate(app) -> None:
    out = os.path.join(app.srcdir, GENERATED)
    os.makedirs(out, exist_ok=True)
    _write(os.path.join(out, "registry_table.md"), registry_table())
    _write(os.path.join(out, "presets_table.md"), presets_table())
    _write(os.path.join(out, "family_tables.md"), family_tables())


_BREAK_AFTER = re.compile(r"(?<=[._(,=/])(?=\w)")


def _break_long_names(app, doctree, docname):
    """Let code in table cells (dotted type names, rule reprs) break after ``.``, ``_``, ``(``.

    Inserts ``<wbr>`` (HTML only), so a long name wraps at a boundary instead of
    mid-word or overflowing, and copied text is unchanged.
    """
    from docutils import nodes

    if app.builder.format != "html":
        return
    for table in doctree.findall(nodes.table):
        for literal in list(table.findall(nodes.literal)):
            text = literal.astext()
            parts = _BREAK_AFTER.split(text)
            if len(parts) < 2 or len(literal.children) != 1:
                continue
            children = []
            for i, part in enumerate(parts):
                if i:
                    children.append(nodes.raw("", "<wbr>", format="html"))
                children.append(nodes.Text(part))
            literal[:] = children


def setup(app):
    app.connect("builder-inited", generate)
    app.connect("doctree-resolved", _break_long_names)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
