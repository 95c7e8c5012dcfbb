#!/usr/bin/env python
"""Side-by-side cost of scoring calibration candidates against activation patching.

On SmolLM2-135M shapes (a random-weight Llama: 30 layers, d=576, 9 heads, 3 key/value heads,
MLP 1536, vocabulary 49152; built locally, nothing is downloaded), with ``--pairs`` random
clean/corrupt pairs of ``--tokens`` tokens differing at one position, and all 90 components
(residual stream entering each block, attention output, MLP output), in one run:

* ``AP``: exact activation patching (:class:`captum_relp.LayerActivationPatching`), what a
  calibration runs once on its pairs;
* ``one pass each``: one :meth:`LayerRelevancePatching.attribute` call per default candidate
  (16 rule sets: every subset of LN-, Identity-, Half- and AH-rule);
* ``shared``: :meth:`LayerRelevancePatching.attribute_rule_sets`, one clean and one corrupt
  forward pass and one backward pass per candidate, as :func:`captum_relp.calibrate_rules` does.

Reported: process CPU seconds of each (one thread), the ratios to AP, and the largest difference
between the shared and the one-pass-each scores.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_calibration.py --pairs 4 --out calibration_scoring.json
    python benchmarks/bench_calibration.py --layers 2 --pairs 2    # smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import captum_relp
from captum_relp import LayerActivationPatching, LayerRelevancePatching, model_components
from captum_relp.calibration import default_candidates, explicit_ruleset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         tie_word_embeddings=True)).eval()
    clean = torch.randint(0, 49152, (args.pairs, args.tokens))
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(0, 49152, (args.pairs,))
    mask = torch.ones_like(clean)
    layers, flags, _ = model_components(model).select(["resid", "attn", "mlp"])
    kwargs = dict(metric=lambda logits: logits[:, -1, 5] - logits[:, -1, 7], attribute_to_layer_input=flags,
                  additional_forward_args={"attention_mask": mask})
    candidates = [explicit_ruleset(c) for c in default_candidates(model)]
    seconds = {}

    began = time.process_time()
    LayerActivationPatching(model, layers).attribute(clean, baselines=corrupt, **kwargs)
    seconds["AP"] = time.process_time() - began
    began = time.process_time()
    each = {c.name: LayerRelevancePatching(model, layers, rules=c).attribute(clean, baselines=corrupt, reduce="sum",
                                                                             **kwargs) for c in candidates}
    seconds["one pass each"] = time.process_time() - began
    began = time.process_time()
    shared = LayerRelevancePatching(model, layers).attribute_rule_sets(clean, corrupt, candidates, reduce="sum",
                                                                       **kwargs)
    seconds["shared"] = time.process_time() - began
    diff = max(float((a - b).abs().max()) for n in each for a, b in zip(each[n], shared[n]))
    scale = max(float(a.abs().max()) for n in each for a in each[n])
    result = {"shape": vars(args), "n_candidates": len(candidates), "n_components": len(layers),
              "cpu_seconds": seconds, "ratio_to_ap": {k: v / seconds["AP"] for k, v in seconds.items()},
              "shared_over_one_pass_each": seconds["shared"] / seconds["one pass each"],
              "max_abs_difference": diff, "max_abs_score": scale,
              "versions": {"captum_relp": captum_relp.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "machine": platform.machine()}
    for name, value in seconds.items():
        print(f"{name:>14}: {value:8.1f} CPU-s  ({value / seconds['AP']:.3f} x AP)")
    print(f"shared / one pass each: {result['shared_over_one_pass_each']:.2f}; "
          f"largest difference {diff:.1e} (largest score {scale:.1e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
