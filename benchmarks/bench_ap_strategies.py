#!/usr/bin/env python
"""AP batching strategies side by side in one run: CPU time ratios and identical effects.

Shapes (``--shapes``):

* ``tiny``: the shipped ``tiny-gpt2-ioi`` (4 layers, d=128) on ``--tiny-prompts`` (25) held-out
  IOI pairs (T=16 with padding), all 12 components (resid/attn/mlp x 4), the IOI metric;
* ``smol``: SmolLM2-135M shapes (random-weight Llama: 30 layers, d=576, 9 heads, 3 kv heads,
  vocabulary 49152, MLP 1536; nothing downloaded), ``--smol-prompts`` (4) random prompts of
  15 tokens, 6 components evenly spread over the 90 (resid 0, attn 6, mlp 11, resid 18,
  attn 23, mlp 29), a logit difference at the last position.

Strategies of :class:`~captum_relp.LayerActivationPatching`: ``batched`` (the default),
``per-example`` (the default of earlier versions: one example per forward on its key/value
cache), ``per-example-nocache``, ``plain`` (one component per forward, all examples) and
``loop`` (``plain`` with one patched copy per forward: one batched forward per component and
position). Each repeat runs every strategy once, in rotated order (a shared machine's drift
hits all); the best of ``--repeats`` process CPU seconds is reported, with its ratio to the
default. Effects are compared with ``torch.equal`` to ``plain`` (``max |diff|`` otherwise).

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_ap_strategies.py --repeats 2 --out ap_strategies.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

STRATEGIES = {
    "batched": dict(strategy="batched"),
    "per-example": dict(strategy="per-example"),
    "per-example-nocache": dict(strategy="per-example", use_cache=False),
    "plain": dict(strategy="plain"),
    "loop": dict(strategy="plain", internal_batch_size=1),
}


def setup(shape: str, n_prompts: int):
    from captum_relp.models import model_components

    if shape == "tiny":
        from captum_relp.embedded import heldout_words, load_embedded
        from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs

        model, tokenizer = load_embedded()
        pairs = generate_ioi_pairs(n_prompts, seed=0, names=heldout_words("tiny-gpt2-ioi", "ioi"), tokenizer=tokenizer)
        batch = encode_ioi(pairs, tokenizer)
        clean, corrupt, mask, metric = batch.clean_ids, batch.corrupt_ids, batch.attention_mask, batch.metric()
        layers, flags, labels = model_components(model).select()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from captum_relp.metrics import LogitDiff

        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                             vocab_size=49152, intermediate_size=1536, tie_word_embeddings=True)
        model = LlamaForCausalLM(config).eval()
        clean = torch.randint(0, config.vocab_size, (n_prompts, 15))
        corrupt = clean.clone()
        corrupt[:, 3] = torch.randint(0, config.vocab_size, (n_prompts,))
        mask = torch.ones_like(clean)
        metric = LogitDiff(torch.randint(0, config.vocab_size, (n_prompts,)),
                           torch.randint(0, config.vocab_size, (n_prompts,)))
        all_layers, all_flags, all_labels = model_components(model).select()
        picks = [round(i * (len(all_layers) - 1) / 5) for i in range(6)]
        layers, flags, labels = ([seq[i] for i in picks] for seq in (all_layers, all_flags, all_labels))
    kwargs = dict(baselines=corrupt, metric=metric, additional_forward_args={"attention_mask": mask},
                  attribute_to_layer_input=flags, internal_batch_size=64)
    return model, layers, clean, kwargs, labels


def bench(shape: str, n_prompts: int, repeats: int, strategies) -> dict:
    from captum_relp import LayerActivationPatching

    model, layers, clean, kwargs, labels = setup(shape, n_prompts)
    ap = LayerActivationPatching(model, layers)
    seconds = {name: [] for name in strategies}
    effects = {}
    for repeat in range(repeats):
        order = strategies[repeat % len(strategies):] + strategies[: repeat % len(strategies)]
        for name in order:
            began = time.process_time()
            effects[name] = ap.attribute(clean, **{**kwargs, **STRATEGIES[name]})
            seconds[name].append(time.process_time() - began)
            print(f"{shape} {name:<20} {seconds[name][-1]:7.2f} CPU-s", flush=True)
    best = {name: min(values) for name, values in seconds.items()}
    reference = effects.get("plain", effects[strategies[0]])
    same = {name: all(torch.equal(a, b) for a, b in zip(out, reference)) for name, out in effects.items()}
    diff = {name: max(float((a - b).abs().max()) for a, b in zip(out, reference)) for name, out in effects.items()}
    base = best.get("per-example", best[strategies[0]])
    return {"shape": shape, "n_prompts": n_prompts, "seq_len": int(clean.shape[1]), "components": [list(x) for x in labels],
            "cpu_seconds_best": best, "cpu_seconds_all": seconds,
            "speedup_vs_previous_default": {name: base / value for name, value in best.items()},
            "equal_to_plain": same, "max_abs_diff_to_plain": diff,
            "default_is_slowest": best["batched"] >= max(best.values()) if "batched" in best else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,smol")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--tiny-prompts", type=int, default=25)
    parser.add_argument("--smol-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    strategies = [s for s in opts.strategies.split(",") if s]
    results = {"threads": opts.threads, "torch": torch.__version__, "runs": []}
    for shape in opts.shapes.split(","):
        prompts = opts.tiny_prompts if shape == "tiny" else opts.smol_prompts
        run = bench(shape, prompts, opts.repeats, strategies)
        results["runs"].append(run)
        print(f"\n{shape}: best CPU-s and speed-up over the previous default (per-example)")
        for name, value in run["cpu_seconds_best"].items():
            print(f"  {name:<20}{value:8.2f}{run['speedup_vs_previous_default'][name]:8.2f}x  "
                  f"equal={run['equal_to_plain'][name]} max|diff|={run['max_abs_diff_to_plain'][name]:.1e}")
    if opts.out:
        with open(opts.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
