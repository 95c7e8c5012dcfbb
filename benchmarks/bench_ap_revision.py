#!/usr/bin/env python
"""The batched AP strategy of this tree against a git revision's, alternating in one process.

The revision's ``captum_relp/attr/_batched_patching.py`` (``git show REV:...``) is loaded as a
module of this tree's package and swapped in as the runner of
:class:`~captum_relp.LayerActivationPatching`; everything else is this tree's code. Shapes are
those of ``bench_ap_strategies.py`` (``smol``: SmolLM2-135M shapes, 4 prompts x 15 tokens, 6
components; ``tiny``: ``tiny-gpt2-ioi``, 25 IOI pairs, 12 components). Runs alternate
(``old, new`` then ``new, old``); ``per-example`` (the default before the batched strategy)
runs once, in the second round. Reported: best process CPU seconds, their ratios, and whether
the two runners' effects are ``torch.equal``.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_ap_revision.py --ref dad9c98 --repeats 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_ap_strategies  # noqa: E402


def load_runner_module(ref: str):
    """The revision's ``_batched_patching`` module, imported inside this tree's package."""
    source = subprocess.run(["git", "-C", HERE, "show", f"{ref}:captum_relp/attr/_batched_patching.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "_batched_patching_ref.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("captum_relp.attr._batched_patching_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="dad9c98", help="git revision of the old runner")
    parser.add_argument("--shapes", default="smol,tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    import captum_relp.attr.layer_activation_patching as lap
    from captum_relp import LayerActivationPatching
    from captum_relp.attr import _batched_patching as new

    runners = {"old": load_runner_module(opts.ref).BatchedPatchRunner, "new": new.BatchedPatchRunner}
    out = {"ref": opts.ref, "torch": torch.__version__}
    try:
        for shape in opts.shapes.split(","):
            model, layers, clean, kwargs, _ = bench_ap_strategies.setup(shape, 4 if shape == "smol" else 25)
            ap = LayerActivationPatching(model, layers)
            seconds, effects = {"old": [], "new": [], "per-example": []}, {}
            for repeat in range(opts.repeats):
                names = ["old", "new"] if repeat % 2 == 0 else ["new", "old"]
                for name in names + (["per-example"] if repeat == 1 else []):
                    lap.BatchedPatchRunner = runners.get(name, runners["new"])
                    strategy = "per-example" if name == "per-example" else "batched"
                    began = time.process_time()
                    effects[name] = ap.attribute(clean, **{**kwargs, "strategy": strategy})
                    seconds[name].append(time.process_time() - began)
                    print(shape, name, round(seconds[name][-1], 2), flush=True)
            best = {name: min(values) for name, values in seconds.items() if values}
            same = all(torch.equal(a, b) for a, b in zip(effects["old"], effects["new"]))
            out[shape] = {"best": best, "all": seconds, "new_equal_old": same}
            print(shape, best, "old/new", round(best["old"] / best["new"], 2), "equal", same, flush=True)
    finally:
        lap.BatchedPatchRunner = runners["new"]
    if opts.out:
        with open(opts.out, "w") as handle:
            json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main()
