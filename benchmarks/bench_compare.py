#!/usr/bin/env python
"""This tree against a previous revision, side by side in one run, over sequence lengths.

For each sequence length (``--seq-lens``, e.g. ``16,32,64,128,256,512,1024``) and each
method, the worker of ``bench_methods.py`` runs in a fresh subprocess twice: once
importing this tree's ``captum_relp`` and once importing the ``captum_relp`` of
``--baseline-ref`` (extracted with ``git archive`` into a temporary folder; no
worktree or checkout is touched). Runs alternate (baseline first for odd lengths) so
that drifts of a shared machine hit both. Reported: wall time (median of
``--repeats`` for AtP/RelP), peak memory (CPU: peak RSS of the worker; CUDA:
``max_memory_allocated``) and the ratios current / baseline, plus RelP / AtP.

Examples::

    python benchmarks/bench_compare.py --baseline-ref c368263 --methods RelP,AtP --n-prompts 8 --seq-lens 64
    python benchmarks/bench_compare.py --no-baseline --methods RelP,AtP --seq-lens 16,64,256,1024 --n-prompts 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_methods  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract_revision(rev: str, into: str) -> str:
    """``captum_relp`` of git revision ``rev`` under ``into``; returns the folder to put on PYTHONPATH."""
    archive = os.path.join(into, "rev.tar")
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", ROOT, "archive", rev, "captum_relp"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into)
    return into


def compare(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-ref", default="c368263", help="git revision to compare against")
    p.add_argument("--no-baseline", action="store_true", help="only this tree (sequence-length sweep)")
    p.add_argument("--seq-lens", default="64", help="comma-separated sequence lengths, e.g. 16,32,...,1024")
    p.add_argument("--out", help="write results as JSON here")
    opts, rest = p.parse_known_args(argv)
    worker_opts = bench_methods.parse_args(rest)
    lengths = [int(t) for t in opts.seq_lens.split(",") if t]
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline_path = None if opts.no_baseline else extract_revision(opts.baseline_ref, tmp)
        current_path = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
        for index, seq_len in enumerate(lengths):
            for method in worker_opts.methods:
                impls = [("current", current_path)] + ([("baseline", baseline_path)] if baseline_path else [])
                if index % 2:
                    impls.reverse()
                result: Dict[str, Any] = {"seq_len": seq_len, "method": method}
                for impl, path in impls:
                    sub = argparse.Namespace(**{**vars(worker_opts), "seq_len": seq_len, "impl": impl})
                    r = bench_methods.run_in_subprocess(method, sub, pythonpath=path)
                    result[impl] = {k: r[k] for k in ("wall_s", "wall_s_all_repeats", "peak_mem_mib",
                                                      "forward_calls", "forward_rows", "n_prompts_run")}
                if "baseline" in result:
                    result["time_ratio"] = result["current"]["wall_s"] / result["baseline"]["wall_s"]
                    base_mem = result["baseline"]["peak_mem_mib"]
                    result["mem_ratio"] = result["current"]["peak_mem_mib"] / base_mem if base_mem > 0 else None
                rows.append(result)
                print(_line(result), flush=True)
    for seq_len in lengths:  # RelP / AtP of this tree
        by = {r["method"]: r for r in rows if r["seq_len"] == seq_len}
        if "RelP" in by and "AtP" in by:
            relp, atp = by["RelP"]["current"], by["AtP"]["current"]
            print(f"T={seq_len}: RelP/AtP time {relp['wall_s'] / atp['wall_s']:.2f}, "
                  f"memory {relp['peak_mem_mib'] / max(atp['peak_mem_mib'], 1e-9):.2f}")
    report = {"setup": {**{k: v for k, v in vars(worker_opts).items() if k != "methods"},
                        "methods": worker_opts.methods, "baseline_ref": None if opts.no_baseline else opts.baseline_ref,
                        "seq_lens": lengths}, "results": rows}
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {opts.out}")
    return report


def _line(r: Dict[str, Any]) -> str:
    cur = r["current"]
    text = f"T={r['seq_len']:<5} {r['method']:<5} current {cur['wall_s']:8.3f}s {cur['peak_mem_mib']:8.1f} MiB"
    if "baseline" in r:
        base = r["baseline"]
        mem = f"{r['mem_ratio']:.2f}" if r["mem_ratio"] is not None else "-"
        text += (f" | baseline {base['wall_s']:8.3f}s {base['peak_mem_mib']:8.1f} MiB"
                 f" | time x{r['time_ratio']:.2f} mem x{mem}")
    return text


if __name__ == "__main__":
    compare()
