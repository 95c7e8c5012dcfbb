#!/usr/bin/env python
"""RelP in this library against the authors' TransformerLens fork, side by side.

One RelP sweep (clean forward and backward under the rules, corrupt forward, full
``(B, T, d)`` scores) of the 36 components of GPT-2 small (residual stream entering each
block, attention output, MLP output; 12 layers) with random weights built here (nothing
downloaded), ``--batch`` (8) prompts of ``--seq-len`` (64) random tokens, and a plain
metric that reads ``logits[:, -1]`` (a logit difference per prompt).

* ``ours``: ``LayerRelevancePatching(model, layers).attribute(clean, baselines=corrupt,
  attribute_to_layer_input=flags, metric=metric)`` on ``GPT2LMHeadModel`` (rules "relp").
* ``fork-lean``: the fork's ``HookedTransformer`` built with ``use_lrp=True`` and
  ``LRP_rules = ['LN-rule', 'Identity-rule', 'Half-rule']`` (the same rules), the same
  weights (converted with the fork's ``convert_gpt2_weights``, no folding or centring),
  forward hooks caching the 36 hook points and backward hooks caching their gradients
  (the demo's ``get_cache_fwd_and_bwd``), parameters frozen, the corrupt run without grad.
* ``fork-demo``: as ``demos/lrp_patching.ipynb`` runs it: ``set_use_attn_result``,
  ``set_use_hook_mlp_in``, ``set_use_attn_in``, ``set_use_split_qkv_input``, every hook
  point but the q/k/v inputs cached, parameter gradients on (``value.backward()``).

Each side runs in a fresh subprocess (ours with this interpreter, the fork with
``--fork-python`` and ``--fork-path`` on its path), in rotated order, ``--repeats`` times
(15). Per run: process CPU seconds and wall seconds of the sweep, and its peak RSS above
the RSS after setup (``/proc/self/clear_refs`` resets the peak, as in ``bench_methods.py``).
Reported: the best of the repeats per side, the ratios ours / fork, and the largest
absolute difference between the scores of ours and of each fork variant.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_fork.py --fork-python /tmp/forkvenv/bin/python \\
        --fork-path /tmp/relp_fork/TransformerLens --repeats 15 --sides ours,fork-lean --out fork.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDES = ("ours", "fork-lean", "fork-demo")
RULES = ["LN-rule", "Identity-rule", "Half-rule"]


# ----------------------------------------------------------------------------- shared


def gpt2_config(small: bool):
    from transformers import GPT2Config

    if small:
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    return GPT2Config()  # GPT-2 small: 12 layers, d=768, 12 heads, vocab 50257


def metric_of(answers: torch.Tensor):
    """A plain metric, as Captum users write one: correct minus wrong logit at the last position."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        pair = logits[:, -1].gather(1, answers)
        return pair[:, 0] - pair[:, 1]

    return metric


def load_gpt2(folder: str):
    """The saved GPT-2 (``save_pretrained`` by the driver), checked to have every weight."""
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"weights do not match: {info}")
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("the unembedding is not tied to the token embedding")
    return model.float().eval()


def _reset_peak_rss() -> int:
    """Reset the peak-RSS counter; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def _measure(sweep, warmup) -> Dict[str, Any]:
    warmup()  # one tiny run: kernels and lazy initialisation, outside the measurement
    baseline = _reset_peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    scores = sweep()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"scores": scores, "cpu_s": cpu, "wall_s": wall, "peak_mib": max(peak - baseline, 0) / 2**20}


# ----------------------------------------------------------------------------- workers


def worker_ours(data: Dict[str, Any]) -> Dict[str, Any]:
    sys.path.insert(0, ROOT)
    from captum_relp import LayerRelevancePatching, model_components

    model = load_gpt2(data["folder"])
    layers, flags, _ = model_components(model).select(["resid", "attn", "mlp"])
    relp = LayerRelevancePatching(model, layers)
    clean, corrupt, answers = data["clean"], data["corrupt"], data["answers"]

    def sweep(c=clean, k=corrupt, a=answers):
        return relp.attribute(c, baselines=k, attribute_to_layer_input=flags, metric=metric_of(a))

    result = _measure(sweep, lambda: sweep(clean[:1, :4], corrupt[:1, :4], answers[:1]))
    n = len(model.transformer.h)
    # same order as the fork's names: per layer resid_pre, attn_out, mlp_out
    result["scores"] = [result["scores"][kind * n + i] for i in range(n) for kind in range(3)]
    return result


def worker_fork(data: Dict[str, Any], variant: str, fork_path: str, exact_identity: bool = False) -> Dict[str, Any]:
    sys.path.insert(0, fork_path)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = load_gpt2(data["folder"])
    hf_config = hf.config
    cfg = HookedTransformerConfig(
        n_layers=hf_config.n_layer, d_model=hf_config.n_embd, n_heads=hf_config.n_head,
        d_head=hf_config.n_embd // hf_config.n_head, d_mlp=4 * hf_config.n_embd, d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.n_positions, act_fn="gelu_new", normalization_type="LN",
        eps=hf_config.layer_norm_epsilon, use_lrp=True, original_architecture="GPT2LMHeadModel",
        init_weights=False,  # every weight is loaded below
    )
    cfg.LRP_rules = list(RULES)
    if exact_identity:  # diagnostic: the Identity-rule ratio act(x) / x without the fork's 1e-6 shift
        from transformer_lens.utilities import activation_functions

        activation_functions.stabilize = lambda z: torch.where(z == 0, torch.full_like(z, 1e-6), z)
    model = HookedTransformer(cfg)  # use_lrp is read when the MLPs are built (Identity-rule)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    del hf
    model.eval()
    names = [f"blocks.{i}.hook_{kind}" for i in range(cfg.n_layers) for kind in ("resid_pre", "attn_out", "mlp_out")]
    wanted = set(names)
    if variant == "fork-demo":
        model.set_use_attn_result(True)
        model.set_use_hook_mlp_in(True)
        model.set_use_attn_in(True)
        model.set_use_split_qkv_input(True)
        cached = lambda name: "_input" not in name  # noqa: E731  (the demo's filter_not_qkv_input)
    else:
        model.requires_grad_(False)
        cached = wanted.__contains__
    clean, corrupt, answers = data["clean"], data["corrupt"], data["answers"]

    def sweep(c=clean, k=corrupt, a=answers):
        model.reset_hooks()
        acts: Dict[str, torch.Tensor] = {}
        grads: Dict[str, torch.Tensor] = {}

        def forward_hook(act, hook):
            acts[hook.name] = act.detach()
            if variant == "fork-lean" and hook.name == names[0]:
                return act.detach().requires_grad_(True)  # frozen parameters: the graph starts here
            return None

        def backward_hook(grad, hook):
            grads[hook.name] = grad.detach()

        model.add_hook(cached, forward_hook, "fwd")
        model.add_hook(cached, backward_hook, "bwd")
        metric_of(a)(model(c)).sum().backward()
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            _, corrupt_cache = model.run_with_cache(k, names_filter=wanted.__contains__)
        return [grads[n] * (acts[n] - corrupt_cache[n]) for n in names]

    return _measure(sweep, lambda: sweep(clean[:1, :4], corrupt[:1, :4], answers[:1]))


def worker_main(opts: argparse.Namespace) -> None:
    torch.set_num_threads(opts.threads)
    data = torch.load(opts.data)
    if opts.worker == "ours":
        result = worker_ours(data)
    else:
        result = worker_fork(data, opts.worker, opts.fork_path, opts.fork_exact_identity)
    scores = result.pop("scores")
    if opts.scores_out:
        torch.save([s.detach().contiguous() for s in scores], opts.scores_out)
    result["torch"] = torch.__version__
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------- driver


def make_data(opts: argparse.Namespace, path: str) -> None:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(opts.seed)
    config = gpt2_config(opts.small)
    model = GPT2LMHeadModel(config)
    clean = torch.randint(0, config.vocab_size, (opts.batch, opts.seq_len))
    corrupt = clean.clone()
    corrupt[:, opts.seq_len // 3] = torch.randint(0, config.vocab_size, (opts.batch,))  # a name swap
    corrupt[:, opts.seq_len // 2] = torch.randint(0, config.vocab_size, (opts.batch,))
    answers = torch.randint(0, config.vocab_size, (opts.batch, 2))
    folder = os.path.join(os.path.dirname(path), "gpt2")
    model.save_pretrained(folder)
    torch.save({"folder": folder, "clean": clean, "corrupt": corrupt, "answers": answers}, path)


def run_side(side: str, opts: argparse.Namespace, data: str, scores_out: Optional[str]) -> Dict[str, Any]:
    python = sys.executable if side == "ours" else opts.fork_python
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--data", data, "--threads", str(opts.threads),
           "--fork-path", opts.fork_path] + (["--small"] if opts.small else [])
    cmd += ["--fork-exact-identity"] if opts.fork_exact_identity else []
    if scores_out:
        cmd += ["--scores-out", scores_out]
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    if side != "ours":
        env.pop("PYTHONPATH", None)  # the fork's interpreter sees only its own packages
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare_scores(ours: str, fork: str) -> Dict[str, float]:
    a, b = torch.load(ours), torch.load(fork)
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.abs().max()) for x in a)
    sums = torch.stack([x.sum() for x in a]), torch.stack([y.sum() for y in b])
    return {"max_abs_diff": diff, "max_abs_score": scale, "max_rel_diff": diff / scale,
            "component_sum_max_abs_diff": float((sums[0] - sums[1]).abs().max())}


def summarize(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, float]]:
    return {side: {key: min(r[key] for r in rs) for key in ("cpu_s", "wall_s", "peak_mib")}
            for side, rs in runs.items()}


def format_table(best: Dict[str, Dict[str, float]], agree: Dict[str, Dict[str, float]]) -> str:
    ours = best["ours"]
    lines = ["| side | CPU s | wall s | peak RSS MiB | ours/side CPU | ours/side wall | ours/side RSS | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for side, b in best.items():
        diff = agree.get(side, {}).get("max_abs_diff")
        lines.append(
            f"| {side} | {b['cpu_s']:.2f} | {b['wall_s']:.2f} | {b['peak_mib']:.0f} | "
            f"{ours['cpu_s'] / b['cpu_s']:.2f} | {ours['wall_s'] / b['wall_s']:.2f} | "
            f"{ours['peak_mib'] / b['peak_mib']:.2f} | " + ("-" if diff is None else f"{diff:.2e}") + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fork-python", default="/tmp/forkvenv/bin/python",
                   help="interpreter of an environment with the fork's TransformerLens installed")
    p.add_argument("--fork-path", default="/tmp/relp_fork/TransformerLens",
                   help="the fork's TransformerLens folder (put first on the fork worker's path)")
    p.add_argument("--sides", default="ours,fork-lean",
                   help=f"comma-separated, from {SIDES}; 'ours' is always run (fork-demo is slow: minutes per run)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="2-layer d=64 smoke configuration")
    p.add_argument("--fork-exact-identity", action="store_true",
                   help="diagnostic: drop the fork's 1e-6 shift of x in the Identity-rule ratio act(x) / x "
                        "(stabilize), to check that the remaining score difference is float32 rounding")
    p.add_argument("--out", help="write all runs and the summary as JSON here")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--scores-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    opts = parse_args(argv)
    if opts.worker:
        worker_main(opts)
        return {}
    sides = ["ours"] + [s for s in opts.sides.split(",") if s and s != "ours"]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    runs: Dict[str, List[Dict[str, Any]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.pt")
        make_data(opts, data)
        for repeat in range(opts.repeats):
            order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]
            for side in order:
                scores = os.path.join(tmp, f"{side}.pt") if repeat == 0 else None
                runs[side].append(run_side(side, opts, data, scores))
                r = runs[side][-1]
                print(f"[{repeat + 1}/{opts.repeats}] {side:9s} cpu {r['cpu_s']:.2f} s  wall {r['wall_s']:.2f} s  "
                      f"peak {r['peak_mib']:.0f} MiB", flush=True)
        agree = {side: compare_scores(os.path.join(tmp, "ours.pt"), os.path.join(tmp, f"{side}.pt"))
                 for side in sides if side != "ours"}
    best = summarize(runs)
    table = format_table(best, agree)
    print(f"\nB={opts.batch} T={opts.seq_len} {'small' if opts.small else 'GPT-2 small'}, best of {opts.repeats}, "
          f"{opts.threads} thread(s)\n" + table)
    for side, a in agree.items():
        print(f"scores ours vs {side}: max |diff| {a['max_abs_diff']:.3e} (largest |score| {a['max_abs_score']:.3e}, "
              f"relative {a['max_rel_diff']:.1e}); component sums max |diff| {a['component_sum_max_abs_diff']:.3e}")
    result = {"options": {k: v for k, v in vars(opts).items() if k not in ("worker", "data", "scores_out")},
              "runs": runs, "best": best, "agreement": agree, "table": table}
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
