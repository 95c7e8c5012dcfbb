"""captum_relp.experiments.checkpoint: fingerprints that tell configurations apart, whole entries only."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from captum_relp.experiments.checkpoint import (
    Checkpoint,
    CheckpointMismatch,
    checkpointed,
    model_digest,
    run_fingerprint,
)


def test_one_changed_weight_changes_the_fingerprint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.GELU(), nn.Linear(300, 2))
    before = run_fingerprint(model, batch_size=4)
    with torch.no_grad():
        model[0].weight[123, 45] += 1e-3  # not among the sampled values: the sum catches it
    after = run_fingerprint(model, batch_size=4)
    assert before["model"] != after["model"]
    assert {k for k in before if before[k] != after[k]} == {"model"}
    assert run_fingerprint(model.double(), batch_size=4)["dtype"] == "torch.float64"


def test_a_resumed_checkpoint_of_other_settings_names_every_difference(tmp_path):
    Checkpoint(tmp_path, "run").open({"batch_size": 4, "seed": 0, "rules": ["relp"]})
    with pytest.raises(CheckpointMismatch) as caught:
        Checkpoint(tmp_path, "run", resume=True).open({"batch_size": 4, "seed": 1, "rules": ["relp", "relp-ah"]})
    assert caught.value.differences == {"rules": (["relp"], ["relp", "relp-ah"]), "seed": (0, 1)}
    assert isinstance(caught.value, ValueError)


def test_a_checkpoint_is_not_reused_without_resume(tmp_path):
    first = Checkpoint(tmp_path, "run")
    first.open({"seed": 0})
    first.save("AtP_000000", {"x": np.ones(2)})
    with pytest.raises(ValueError, match="resume it, or discard it"):
        Checkpoint(tmp_path, "run").open({"seed": 0})
    other = Checkpoint(tmp_path, "other")  # another name in the same folder is another checkpoint
    assert other.open({"seed": 5}) == 0
    first.discard()
    assert not first.exists() and other.exists()


def test_entries_without_a_fingerprint_are_refused(tmp_path):
    np.savez(tmp_path / "run_AtP_000000.npz", x=np.ones(1))
    with pytest.raises(ValueError, match="no run.checkpoint.json"):
        Checkpoint(tmp_path, "run", resume=True).open({})


def test_an_interrupted_save_leaves_no_entry(tmp_path, monkeypatch):
    store = Checkpoint(tmp_path, "run")
    store.open({})

    def broken(path, **arrays):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(KeyboardInterrupt):
        store.save("AP_000000", {"x": np.ones(3)})
    assert store.entries() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint.json"]


def test_checkpointed_reads_back_exactly_what_it_computed(tmp_path):
    store = Checkpoint(tmp_path, "run")
    store.open({})
    values = [torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5)]
    first, seconds = checkpointed(store, "RelP_000000", lambda: values)
    again, seconds_again = checkpointed(store, "RelP_000000", lambda: pytest.fail("computed twice"))
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(first, again))
    assert torch.equal(again[0], values[0].float()) and seconds_again == seconds


def test_load_before_open_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="call open"):
        Checkpoint(tmp_path, "run").load("AtP_000000")


def test_fingerprints_record_what_they_are_given():
    fingerprint = run_fingerprint(nn.Linear(2, 2), rules=["relp"], ids=torch.arange(4))
    assert fingerprint["rules"] == ["relp"] and fingerprint["ids"].startswith("int64[4]:")
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    with pytest.raises(TypeError, match="cannot record a object"):
        run_fingerprint(nn.Linear(2, 2), thing=object())
    with pytest.raises(ValueError, match="setting 'torch'"):
        run_fingerprint(nn.Linear(2, 2), torch="2.0")
    assert model_digest(nn.Linear(2, 2)) != model_digest(nn.Linear(2, 2))
