"""Gemma-3 270M IOI: RelP with the LN-rule on the query/key norms (the rule before version 0.2.0)
against RelP with their plain gradient (the ``"relp"`` preset now), AtP and RelP+AH.

    OMP_NUM_THREADS=1 python scripts/gemma3_qk_norms.py --n 16

Same pairs, positions and AP as ``gemma3_results.py`` (the first ``n`` IOI pairs); writes
``docs/_static/results/gemma3/qk_norms.json``, which ``gemma3_results.py`` renders.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _real_model import pcc_tables, pick, role_patching
from _real_model_runs import task_split
from captum_relp import LayerAttributionPatching, LayerRelevancePatching, RuleSet
from captum_relp.embedded import load_model
from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import model_components
from captum_relp.rules import RMSNormRule

OUT = Path(__file__).resolve().parents[1] / "docs" / "_static" / "results" / "gemma3" / "qk_norms.json"
_LN = RMSNormRule(weight_offset=1.0)  # Gemma3RMSNorm's LN-rule, as the registry gives it
VARIANTS = {"RelP, LN-rule on q/k norms": RuleSet("relp-ln-qk", name_map={"*.q_norm": _LN, "*.k_norm": _LN}),
            "RelP": "relp", "RelP+AH": "relp-ah", "AtP": "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    began = time.perf_counter()
    model, tokenizer = load_model("gemma3-270m", "cpu", "float32")
    batch, positions, _ = task_split("ioi", "eval", args.n, 0, tokenizer)
    layers, flags, _ = model_components(model).select(KINDS)
    raw = {name: [] for name in VARIANTS}
    for start in range(0, args.n, 8):
        rows = batch.select(slice(start, start + 8))
        kwargs = dict(baselines=rows.corrupt_ids, metric=rows.metric(), attribute_to_layer_input=flags,
                      additional_forward_args={"attention_mask": rows.attention_mask}, reduce="sum")
        for name, rules in VARIANTS.items():
            method = (LayerAttributionPatching(model, layers) if rules == "none"
                      else LayerRelevancePatching(model, layers, rules=rules))
            raw[name].append(torch.stack([v.float() for v in method.attribute(rows.clean_ids, **kwargs)], 1).numpy())
    scores = {name: pick(np.concatenate(v), positions) for name, v in raw.items()}
    scores["AP"] = role_patching(model, batch, positions)
    tables = pcc_tables(scores, len(layers) // 3)
    OUT.write_text(json.dumps({"command": f"OMP_NUM_THREADS=1 python scripts/gemma3_qk_norms.py --n {args.n}",
                               "n": args.n, "pcc": tables, "wall_seconds": time.perf_counter() - began},
                              indent=2))
    for kind in KINDS:
        print(kind, "  ".join(f"{m} {v[0]:.3f}" for m, v in tables["per_prompt"][kind].items()))


if __name__ == "__main__":
    main()
