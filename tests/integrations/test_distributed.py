"""``captum-relp ioi`` under torchrun (2 CPU processes, gloo) equals a single process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_relp.integrations.distributed import DataParallelSweep, init_from_env

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port each run
ARGS = ["-m", "captum_relp.cli", "ioi", "--n-prompts", "6", "--batch-size", "2", "--no-plots",
        "--quiet", "--device", "cpu", "--rules", "relp,relp-ah"]


def _run(prefix, out: Path, args=ARGS, results="ioi_results.json"):
    """The CLI with ``args`` (under ``prefix``, e.g. torchrun); its results JSON and stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *prefix, *args, "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / results).read_text()), done.stdout


def test_single_process_sweep_is_the_whole_sweep():
    sweep = DataParallelSweep()
    assert (sweep.rank, sweep.world_size, sweep.is_main) == (0, 1, True)
    assert sweep.gather(["a", "b"], 2) == ["a", "b"] and init_from_env() is False
    assert list(DataParallelSweep(1, 2).shard(range(5))) == [1, 3]
    with pytest.raises(ValueError, match="outside world size"):
        DataParallelSweep(2, 2)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_equal_one(tmp_path):
    single, _ = _run([], tmp_path / "one")
    sharded, _ = _run(TORCHRUN,
                      tmp_path / "two")
    for key in ("config", "pcc_per_prompt", "pcc_mean_map", "mean_maps", "position_labels"):
        assert sharded[key] == single[key], key  # bit-identical: same batches, same padding


CIRCUIT_ARGS = ["-m", "captum_relp.cli", "circuit", "--task", "ioi", "--nodes", "components", "--method",
                "relp,atp", "--n-train", "6", "--n-test", "4", "--batch-size", "2", "--no-plots", "--quiet",
                "--device", "cpu"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_circuit_two_processes_equal_one(tmp_path):
    single, _ = _run([], tmp_path / "one", CIRCUIT_ARGS, "circuit_results.json")
    sharded, _ = _run(TORCHRUN,
                      tmp_path / "two", CIRCUIT_ARGS, "circuit_results.json")
    assert sharded["curves"] == single["curves"]  # same batches summed in the same order: identical
    for method in ("RelP", "AtP"):  # every batch scored once, by one of the ranks
        for key in ("forward_passes", "backward_passes"):
            assert sharded["cost"][method][key] == single["cost"][method][key]


EDGES_ARGS = ["-m", "captum_relp.cli", "edges", "--method", "relp,eap,eap-ig", "--n-prompts", "3", "--n-eval", "2",
              "--repeats", "1", "--n-steps", "2", "--no-plots", "--quiet", "--device", "cpu"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_edges_two_processes_equal_one(tmp_path):
    single, _ = _run([], tmp_path / "one", EDGES_ARGS, "edges_results.json")
    sharded, stdout = _run(TORCHRUN,
                           tmp_path / "two", EDGES_ARGS, "edges_results.json")
    assert stdout.count("wrote") == 1  # rank 0 writes, rank 1 only computes its share
    timings = ("seconds", "time_vs_eap")  # wall times differ between runs; everything else is identical
    for method in ("relp", "eap", "eap-ig", "exact"):
        assert {k: v for k, v in sharded[method].items() if k not in timings} == \
            {k: v for k, v in single[method].items() if k not in timings}, method
    assert sharded["meta"] == single["meta"]
    assert single["exact"]["n_forward"] > 3  # several groups of edges, so both ranks patched some
