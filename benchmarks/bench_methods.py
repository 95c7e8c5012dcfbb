#!/usr/bin/env python
"""Side-by-side cost of AP, IG, AtP and RelP on all components of a GPT-2-small-sized model.

Measures, in one run, wall time, peak memory and the number of forward / backward
passes of

* AP   -- exact activation patching (:class:`captum_relp.LayerActivationPatching`),
* IG   -- Captum's LayerIntegratedGradients, one layer at a time, ``--ig-steps`` (10),
* AtP  -- attribution patching (:class:`captum_relp.LayerAttributionPatching`),
* RelP -- relevance patching (:class:`captum_relp.LayerRelevancePatching`),

for every component (residual stream entering each block, attention output, MLP
output; every layer and position) of ``GPT2LMHeadModel(GPT2Config())`` (124M
parameters, random weights, built locally: nothing is downloaded) on random
clean/corrupt token-id pairs differing at two positions, with the metric
``logit(correct) - logit(wrong)`` at the last position.

Memory:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus the memory allocated after model and input creation.
* CPU: each method runs in a fresh subprocess (this script with the hidden
  ``--worker METHOD`` flag). After building the model and inputs the worker resets
  the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux), records the
  current RSS, runs the method and reports ``ru_maxrss`` (peak RSS) minus that
  baseline. Where the reset is unavailable the baseline is the peak RSS after setup.

Passes are counted with a forward hook on the model (one count per model call,
plus the number of rows of the output logits) and a gradient hook on the logits
(one count per backward pass through the model). "fwd-eq" is rows / n_prompts:
forward passes in units of a full batch of prompts.

Examples::

    python benchmarks/bench_methods.py --small                      # smoke run, seconds
    python benchmarks/bench_methods.py --ap-prompts 4 --ig-prompts 2 --out bench.json
    python benchmarks/bench_methods.py --small --ap-sweep           # AP batching options
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch

METHODS = ("AP", "IG", "AtP", "RelP")


# ----------------------------------------------------------------------------- setup


def build_model(small: bool, dtype: torch.dtype, device: str, seed: int = 0, arch: str = "gpt2"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if arch in ("llama-1b", "smollm2-135m"):  # random weights, the shapes of the named model
        from transformers import LlamaConfig, LlamaForCausalLM

        if arch == "llama-1b":  # Llama-3.2-1B: 16 layers, d=2048, 32 heads (8 KV), 128256 tokens, 1.2B params
            config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=4096, tie_word_embeddings=True)
        else:  # SmolLM2-135M: 30 layers, d=576, 9 heads (3 KV), MLP 1536, 49152 tokens
            config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                 max_position_embeddings=8192, tie_word_embeddings=True)
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = LlamaForCausalLM(config)
        return model.to(dtype=dtype).eval()
    if small:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128,
                            bos_token_id=999, eos_token_id=999)
    else:
        config = GPT2Config()  # GPT-2 small: 12 layers, d=768, 12 heads, 50257 tokens, 124M params
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    return model


def make_inputs(n_prompts: int, seq_len: int, vocab: int, device: str, seed: int = 0):
    """Random clean ids; corrupt = clean with two (non-final) positions resampled."""
    gen = torch.Generator().manual_seed(seed + 1)
    clean = torch.randint(0, vocab, (n_prompts, seq_len), generator=gen)
    corrupt = clean.clone()
    for row in range(n_prompts):
        positions = torch.randperm(seq_len - 1, generator=gen)[:2]
        for pos in positions.tolist():
            new = int(torch.randint(0, vocab - 1, (1,), generator=gen))
            corrupt[row, pos] = new if new < clean[row, pos] else new + 1  # always different
    correct, wrong = 0, 1
    return clean.to(device), corrupt.to(device), correct, wrong


# ----------------------------------------------------------------------------- memory


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError("no VmRSS")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of what runs between ``start()`` and ``peak_mib()``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.how = ""
        self.baseline = 0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.how = "cuda max_memory_allocated - allocated after setup"
        elif _reset_peak_rss():
            self.baseline = _rss_kb() * 1024
            self.how = "peak RSS (ru_maxrss, peak reset after setup) - RSS after setup"
        else:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.how = "peak RSS (ru_maxrss) - peak RSS after setup (no peak reset available)"

    def peak_mib(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.baseline, 0) / 2**20


# ----------------------------------------------------------------------------- methods


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_method(method: str, opts: argparse.Namespace) -> Dict[str, Any]:
    """Build model and inputs, run one method, return its measurements (one process)."""
    from captum_relp import logit_diff, model_components
    from captum_relp.attr import METHODS as LIBRARY_METHODS
    from captum_relp.attr import PassCounter

    dtype = getattr(torch, opts.dtype)
    torch.set_num_threads(opts.threads) if opts.threads else None
    model = build_model(opts.small, dtype, opts.device, arch=opts.arch)
    n_prompts = {"AP": opts.ap_prompts, "IG": opts.ig_prompts}.get(method) or opts.n_prompts
    n_prompts = min(n_prompts, opts.n_prompts)
    clean, corrupt, correct, wrong = make_inputs(opts.n_prompts, opts.seq_len, model.config.vocab_size, opts.device)
    clean, corrupt = clean[:n_prompts], corrupt[:n_prompts]
    layers, flags, labels = model_components(model).select(["resid", "attn", "mlp"])
    if opts.block_subset:  # only the components of these blocks (e.g. AP timings on one block)
        keep = [i for i, (_, block) in enumerate(labels) if block in opts.block_subset]
        layers, flags, labels = [layers[i] for i in keep], [flags[i] for i in keep], [labels[i] for i in keep]
    metric = logit_diff(correct, wrong)
    if opts.metric != "library":  # the same logit difference as a plain callable, as users write one
        metric = lambda logits: logits[:, -1, correct] - logits[:, -1, wrong]  # noqa: E731
    counter = PassCounter(model).__enter__()
    meter = MemoryMeter(opts.device)

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    options = {"AP": dict(internal_batch_size=opts.ap_batch_size, reuse_prefix=opts.ap_reuse_prefix),
               "IG": dict(n_steps=opts.ig_steps)}.get(method, {})
    if opts.impl == "current":  # options the baseline implementation (--baseline-ref) does not have
        if method in ("AtP", "RelP") and opts.reduce != "none":
            options["reduce"] = opts.reduce
        if method == "AP":
            options["use_cache"] = opts.ap_use_cache
    if opts.metric == "plain-declared":
        options["logit_positions"] = [-1]
    attribution = LIBRARY_METHODS[method].build(model, layers)
    call = lambda: attribution.attribute(  # noqa: E731
        clean, baselines=corrupt, attribute_to_layer_input=flags, metric=metric, **options)

    repeats = opts.repeats if method in ("AtP", "RelP") else 1
    meter.start()
    times, passes = [], None
    for _ in range(repeats):
        counter.reset()
        _sync(opts.device)
        t0 = time.perf_counter()
        result = call()
        _sync(opts.device)
        times.append(time.perf_counter() - t0)
        passes = passes or counter.snapshot()
        # shape check: one (B, T, d) score tensor per component
        assert len(result) == len(layers) and tuple(result[0].shape[:2]) == (n_prompts, opts.seq_len)
        if method in ("AtP", "RelP"):  # the layout the experiments use: summed over hidden units
            result = [r.sum(-1) if r.dim() == 3 else r for r in result]
        del result
    peak = meter.peak_mib()
    counter.__exit__(None, None, None)
    wall = statistics.median(times)
    return {
        "method": method,
        "n_prompts_run": n_prompts,
        "n_components": len(layers),
        "wall_s": wall,
        "wall_s_all_repeats": times,
        "wall_s_per_prompt": wall / n_prompts,
        "peak_mem_mib": peak,
        "memory_method": meter.how,
        **passes,
        "forward_equiv": passes["forward_rows"] / n_prompts,
        "backward_equiv": passes["backward_rows"] / n_prompts,
    }


def _worker_args(opts: argparse.Namespace, method: str) -> List[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", method,
            "--device", opts.device, "--dtype", opts.dtype, "--n-prompts", str(opts.n_prompts),
            "--seq-len", str(opts.seq_len), "--repeats", str(opts.repeats), "--ig-steps", str(opts.ig_steps),
            "--ap-batch-size", str(opts.ap_batch_size),
            "--ap-reuse-prefix", "true" if opts.ap_reuse_prefix else "false",
            "--threads", str(opts.threads), "--reduce", opts.reduce, "--arch", opts.arch, "--metric", opts.metric,
            "--ap-use-cache", "true" if opts.ap_use_cache else "false", "--impl", opts.impl,
            "--blocks", opts.blocks]
    if opts.small:
        argv.append("--small")
    if opts.ap_prompts:
        argv += ["--ap-prompts", str(opts.ap_prompts)]
    if opts.ig_prompts:
        argv += ["--ig-prompts", str(opts.ig_prompts)]
    return argv


def run_in_subprocess(method: str, opts: argparse.Namespace, pythonpath: Optional[str] = None) -> Dict[str, Any]:
    """Run one method in a fresh process; ``pythonpath`` selects the captum_relp it imports."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(_worker_args(opts, method), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"worker {method} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def add_ratios(results: List[Dict[str, Any]], n_prompts: int) -> None:
    """Time / memory relative to AtP; subsets extrapolated linearly in prompts (labelled)."""
    for r in results:
        r["subset"] = r["n_prompts_run"] < n_prompts
        r["wall_s_full_est"] = r["wall_s_per_prompt"] * n_prompts
    atp = next((r for r in results if r["method"] == "AtP"), None)
    for r in results:
        r["time_vs_atp"] = r["wall_s_full_est"] / atp["wall_s"] if atp else None
        r["mem_vs_atp"] = (r["peak_mem_mib"] / atp["peak_mem_mib"]
                           if atp and atp["peak_mem_mib"] > 0 else None)


def format_table(results: List[Dict[str, Any]]) -> str:
    head = (f"{'method':<6} {'prompts':>7} {'fwd calls':>9} {'fwd-eq':>7} {'bwd calls':>9} {'bwd-eq':>7} "
            f"{'wall s':>9} {'s/prompt':>9} {'full s':>10} {'peak MiB':>9} {'t/AtP':>7} {'mem/AtP':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        full = f"{r['wall_s_full_est']:.2f}" + ("*" if r["subset"] else " ")
        lines.append(
            f"{r['method']:<6} {r['n_prompts_run']:>7} {r['forward_calls']:>9} {r['forward_equiv']:>7.0f} "
            f"{r['backward_calls']:>9} {r['backward_equiv']:>7.0f} {r['wall_s']:>9.3f} "
            f"{r['wall_s_per_prompt']:>9.4f} {full:>10} {r['peak_mem_mib']:>9.1f} "
            f"{ratio(r['time_vs_atp']):>7} {ratio(r['mem_vs_atp']):>8}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=15)
    p.add_argument("--small", action="store_true", help="2-layer d=64 model (smoke run)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of AP,IG,AtP,RelP")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of AtP/RelP (median reported)")
    p.add_argument("--ig-steps", type=int, default=10)
    p.add_argument("--metric", choices=["library", "plain", "plain-declared"], default="library",
                   help="logit_diff (default); the same metric as a plain callable, whose read positions "
                        "are found on probes and checked against the full logits in every run ('plain'), "
                        "or declared with logit_positions=[-1] ('plain-declared')")
    p.add_argument("--ap-prompts", type=int, default=0,
                   help="run AP on the first N prompts only; full time extrapolated per prompt")
    p.add_argument("--ig-prompts", type=int, default=0,
                   help="run IG on the first N prompts only; full time extrapolated per prompt")
    p.add_argument("--ap-batch-size", type=int, default=64, help="AP internal_batch_size")
    p.add_argument("--ap-reuse-prefix", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="AP reuse_prefix (true/false)")
    p.add_argument("--ap-sweep", action="store_true",
                   help="only time AP for internal_batch_size 16/64 x reuse_prefix True/False")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--reduce", choices=["none", "sum"], default="sum",
                   help="AtP/RelP reduce= option (default sum: the experiments' layout, reduced in the backward)")
    p.add_argument("--ap-use-cache", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="AP use_cache (key/value-cache suffix runs on causal LMs; true/false)")
    p.add_argument("--arch", choices=["gpt2", "llama-1b", "smollm2-135m"], default="gpt2",
                   help="gpt2: GPT-2 small (or --small); llama-1b / smollm2-135m: Llama-3.2-1B / "
                        "SmolLM2-135M shapes, random weights")
    p.add_argument("--blocks", default="", help="comma-separated block indices: only their components")
    p.add_argument("--impl", choices=["current", "baseline"], default="current", help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true",
                   help="run methods in this process (for tests; CPU memory then relies on the peak reset)")
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    opts.block_subset = [int(b) for b in opts.blocks.split(",") if b.strip()]
    unknown = set(opts.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return opts


def ap_sweep(opts: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = []
    if opts.in_process:  # warm-up (discarded) so the first configuration pays no first-call costs
        run_method("AP", argparse.Namespace(**{**vars(opts), "n_prompts": 1}))
    for reuse in (True, False):
        for batch in (16, 64):
            sub = argparse.Namespace(**{**vars(opts), "ap_batch_size": batch, "ap_reuse_prefix": reuse})
            r = run_method("AP", sub) if opts.in_process else run_in_subprocess("AP", sub)
            r.update(ap_batch_size=batch, ap_reuse_prefix=reuse)
            rows.append(r)
            print(f"AP internal_batch_size={batch:<3} reuse_prefix={str(reuse):<5} "
                  f"calls={r['forward_calls']:>5} wall={r['wall_s']:.3f}s "
                  f"s/prompt={r['wall_s_per_prompt']:.4f} peak={r['peak_mem_mib']:.1f} MiB", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    opts = parse_args(argv)
    if opts.worker:
        print(json.dumps(run_method(opts.worker, opts)))
        return {}

    with torch.device("meta"):  # parameter count without allocating the weights
        probe = build_model(opts.small, torch.float32, "meta", arch=opts.arch)
    n_params = sum(p.numel() for p in probe.parameters())
    n_layers = probe.config.num_hidden_layers
    del probe
    setup = {
        "model": (f"LlamaForCausalLM({opts.arch} shapes)" if opts.arch != "gpt2" else
                  "GPT2LMHeadModel(" + ("small smoke config: 2 layers, d=64" if opts.small else "GPT2Config()") + ")"),
        "reduce": opts.reduce, "ap_use_cache": opts.ap_use_cache,
        "n_params": n_params, "n_layers": n_layers, "components": 3 * n_layers,
        "n_prompts": opts.n_prompts, "seq_len": opts.seq_len, "device": opts.device, "dtype": opts.dtype,
        "torch_threads": opts.threads or torch.get_num_threads(), "repeats_atp_relp": opts.repeats,
        "ig_steps": opts.ig_steps, "ap_internal_batch_size": opts.ap_batch_size,
        "ap_reuse_prefix": opts.ap_reuse_prefix, "torch": torch.__version__,
        "platform": platform.platform(), "isolation": "in-process" if opts.in_process else "subprocess per method",
    }
    print(f"Setup: {setup['model']}, {n_params / 1e6:.1f}M params, {3 * n_layers} components "
          f"(resid/attn/mlp x {n_layers} layers) x {opts.seq_len} positions, {opts.n_prompts} prompt pairs, "
          f"{opts.device}/{opts.dtype}, {setup['torch_threads']} threads", flush=True)
    report: Dict[str, Any] = {"setup": setup}

    if opts.ap_sweep:
        report["ap_sweep"] = ap_sweep(opts)
        if opts.out:
            with open(opts.out, "w") as f:
                json.dump(report, f, indent=2)
        return report

    results = []
    for method in opts.methods:
        r = run_method(method, opts) if opts.in_process else run_in_subprocess(method, opts)
        results.append(r)
        print(f"  {method}: {r['wall_s']:.3f}s on {r['n_prompts_run']} prompts, "
              f"peak {r['peak_mem_mib']:.1f} MiB", flush=True)
    add_ratios(results, opts.n_prompts)
    report["results"] = results

    print()
    print(format_table(results))
    print()
    print("fwd calls / bwd calls: model calls and backward passes through the model (hook counts, one run);")
    print("fwd-eq / bwd-eq: rows through the model / prompts run (passes in units of a full prompt batch).")
    print(f"wall s: {'median of ' + str(opts.repeats) + ' runs for AtP/RelP, ' if opts.repeats > 1 else ''}"
          "one run otherwise. s/prompt = wall s / prompts run.")
    if any(r["subset"] for r in results):
        print(f"full s marked *: measured on a prompt subset and EXTRAPOLATED linearly to {opts.n_prompts} "
              "prompts (s/prompt x n-prompts); not measured.")
    print("t/AtP uses full s; mem/AtP uses peak MiB as measured (subset runs: memory of the subset run).")
    memory_how = results[0]["memory_method"] if results else ""
    print(f"peak MiB: {memory_how}"
          + ("; each method in a fresh subprocess." if not opts.in_process else "; in-process."))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
