"""Smoke test of benchmarks/bench_methods.py: runs in-process on the 2-layer model, no timing asserts."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_small_in_process(bench, tmp_path):
    out = tmp_path / "bench.json"
    n_prompts, seq_len, n_steps, ap_batch = 2, 8, 10, 16
    bench.main(["--small", "--n-prompts", str(n_prompts), "--seq-len", str(seq_len),
                "--repeats", "1", "--in-process",
                "--ap-batch-size", str(ap_batch), "--out", str(out)])
    report = json.loads(out.read_text())
    results = {r["method"]: r for r in report["results"]}
    assert set(results) == {"AP", "IG", "AtP", "RelP"}
    n_layers = report["setup"]["n_layers"]
    components = 3 * n_layers  # resid, attn, mlp per layer
    assert report["setup"]["components"] == components

    # AtP and RelP: clean forward (with grad) + corrupt forward + one backward
    for name in ("AtP", "RelP"):
        r = results[name]
        assert (r["forward_calls"], r["backward_calls"]) == (2, 1), name
        assert (r["forward_rows"], r["backward_rows"]) == (2 * n_prompts, n_prompts), name

    # IG (Captum's LayerIntegratedGradients, one layer at a time): per layer, one forward
    # for the clean and one for the corrupt layer activations, then one forward of
    # n_steps * B interpolated rows and one backward through it.
    ig = results["IG"]
    assert ig["forward_calls"] == components * 3
    assert ig["forward_rows"] == components * (2 + n_steps) * n_prompts
    assert ig["backward_calls"] == components
    assert ig["backward_rows"] == components * n_steps * n_prompts

    # AP (reuse_prefix=True): clean forward + corrupt forwards through Captum's LayerActivation
    # (one per attribute_to_layer_input value: the residual stream is a block input, attention
    # and MLP outputs are outputs, so two) + per component and example,
    # ceil(T / internal_batch_size) patched batches.
    ap = results["AP"]
    chunks = math.ceil(seq_len / ap_batch)
    corrupt_forwards = 2
    assert ap["forward_calls"] == 1 + corrupt_forwards + components * n_prompts * chunks
    assert ap["forward_rows"] == (n_prompts + corrupt_forwards * n_prompts
                                  + components * n_prompts * seq_len)
    assert ap["backward_calls"] == 0

    for r in results.values():
        assert r["wall_s"] > 0 and r["peak_mem_mib"] >= 0
        assert r["time_vs_atp"] is not None


def test_bench_fork_ours_side_small(tmp_path):
    """bench_fork.py's driver and library worker on the 2-layer model (the fork side needs its venv)."""
    spec = importlib.util.spec_from_file_location("bench_fork", SCRIPT.parent / "bench_fork.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fork.json"
    module.main(["--small", "--repeats", "2", "--sides", "ours", "--out", str(out)])
    report = json.loads(out.read_text())
    assert len(report["runs"]["ours"]) == 2
    best = report["best"]["ours"]
    assert best["cpu_s"] == min(r["cpu_s"] for r in report["runs"]["ours"]) and best["peak_mib"] >= 0
