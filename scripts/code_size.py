"""Size of the package and of one RelP call, for before/after notes on restructurings.

``python scripts/code_size.py [package dir]`` prints the package's lines (all; and code lines:
not blank, not comment-only, not inside a docstring) and the package files and functions one
``LayerRelevancePatching.attribute(clean, baselines=corrupt)`` call runs on the shipped
``tiny-gpt2-ioi`` model (traced with ``sys.settrace``, after one warm-up call).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def code_lines(text: str) -> int:
    docs = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docs.update(range(node.lineno, node.end_lineno + 1))
    return sum(1 for i, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def traced_call():
    import captum_relp
    from captum_relp import LayerRelevancePatching, model_components
    from captum_relp.embedded import load_embedded
    from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs

    root = str(Path(captum_relp.__file__).parent)
    model, tok = load_embedded("tiny-gpt2-ioi")
    batch = encode_ioi(generate_ioi_pairs(4, seed=0, tokenizer=tok), tok)
    layers, flags, _ = model_components(model).select(["resid", "attn", "mlp"])
    relp = LayerRelevancePatching(model, layers)
    kwargs = dict(baselines=batch.corrupt_ids, metric=batch.metric(), attribute_to_layer_input=flags,
                  additional_forward_args={"attention_mask": batch.attention_mask})
    relp.attribute(batch.clean_ids, **kwargs)
    functions = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith(root):
            functions.add((frame.f_code.co_filename[len(root) + 1:], frame.f_code.co_name))

    sys.settrace(tracer)
    try:
        relp.attribute(batch.clean_ids, **kwargs)
    finally:
        sys.settrace(None)
    return sorted({f for f, _ in functions}), len(functions)


if __name__ == "__main__":
    package = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "captum_relp")
    texts = [p.read_text() for p in package.rglob("*.py")]
    print(f"{package}: {len(texts)} files, {sum(len(t.splitlines()) for t in texts)} lines, "
          f"{sum(code_lines(t) for t in texts)} code lines")
    files, n_functions = traced_call()
    print(f"attribute(clean, baselines=corrupt) runs {len(files)} package files, {n_functions} functions: {files}")
