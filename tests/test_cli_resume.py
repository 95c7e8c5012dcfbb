"""``--resume``: a run interrupted after some batches continues from its checkpoint and ends with
exactly the results of an uninterrupted run; a checkpoint of another configuration is refused."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from captum_relp.attr.methods import Method
from captum_relp.cli import main
from captum_relp.cli._results import CHECKPOINTS
from captum_relp.embedded import load_embedded
from captum_relp.tasks import generate_ioi_pairs

TIMED = ("seconds", "time_ratio_to_atp")  # wall times differ between any two runs


def _task_file(path: Path, n: int = 6) -> Path:
    _, tok = load_embedded("tiny-gpt2-ioi")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clean", "corrupted", "answer", "foil"])
        for pair in generate_ioi_pairs(n, seed=5, tokenizer=tok):
            writer.writerow([pair.clean_prompt, pair.corrupt_prompt, " " + pair.io_name, " " + pair.s_name])
    return path


def _argv(command: str, task: Path, out: Path, *extra: str) -> list:
    common = ["--device", "cpu", "--quiet", "--threads", "1", "--no-plots", "--out", str(out), "--batch-size", "2"]
    if command == "attribute":
        return ["attribute", "--task", str(task), *common, *extra]
    return ["ioi", "--n-prompts", "4", "--methods", "ap,atp,relp", "--rules", "relp,relp-ah", *common, *extra]


def _count_calls(monkeypatch, raise_at: int = 0) -> list:
    """Every ``Method.attribute`` call as ``(method, first clean row)``; KeyboardInterrupt at call ``raise_at``."""
    real, calls = Method.attribute, []

    def attribute(self, model, layers, inputs, **kwargs):
        if len(calls) + 1 == raise_at:
            raise KeyboardInterrupt
        calls.append((self.name, tuple(inputs[0].tolist())))
        return real(self, model, layers, inputs, **kwargs)

    monkeypatch.setattr(Method, "attribute", attribute)
    return calls


def _results(out: Path, command: str) -> dict:
    """The run's files as data: JSON without the wall times, CSV text, npz arrays."""
    name = "task" if command == "attribute" else "ioi"
    found = {"json": {k: v for k, v in json.loads((out / f"{name}_results.json").read_text()).items()
                      if k not in TIMED},
             "csv": (out / f"{name}_pcc.csv").read_text()}
    if command == "attribute":
        with np.load(out / "task_scores.npz") as scores:
            found["npz"] = {k: scores[k] for k in scores.files}
        found["pairs"] = (out / "task_pairs.jsonl").read_text()
    return found


@pytest.mark.parametrize("command", ["attribute", "ioi"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(command, tmp_path, monkeypatch, capsys):
    task = _task_file(tmp_path / "pairs.csv")
    whole = _count_calls(monkeypatch)
    assert main(_argv(command, task, tmp_path / "whole")) == 0
    expected = _results(tmp_path / "whole", command)
    per_batch = len(whole) // (3 if command == "attribute" else 2)  # calls of one batch of 2 pairs
    monkeypatch.undo()

    out = tmp_path / "out"
    interrupted = _count_calls(monkeypatch, raise_at=per_batch + 3)  # in the middle of the second batch
    with pytest.raises(KeyboardInterrupt):
        main(_argv(command, task, out))
    monkeypatch.undo()
    assert len(interrupted) == per_batch + 2
    assert not [p for p in out.iterdir() if p.name != CHECKPOINTS]  # no results, only the checkpoint
    assert len(list((out / CHECKPOINTS).glob("*.npz"))) == per_batch + 2
    assert "finished batch results are kept" in capsys.readouterr().err

    # without --resume the checkpoint is not reused silently
    assert main(_argv(command, task, out)) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err

    resumed = _count_calls(monkeypatch)
    assert main(_argv(command, task, out, "--resume")) == 0
    assert f"{per_batch + 2} finished batch results" in capsys.readouterr().err
    assert sorted(resumed + interrupted) == sorted(whole)  # nothing saved was computed again
    got = _results(out, command)
    assert got["json"] == expected["json"] and got["csv"] == expected["csv"]
    if command == "attribute":
        assert got["npz"].keys() == expected["npz"].keys()
        for key, values in expected["npz"].items():
            assert np.array_equal(got["npz"][key], values), key  # bit for bit
        assert got["pairs"] == expected["pairs"]
    assert not (out / CHECKPOINTS).exists()  # removed once the results are in --out
    manifest = json.loads((out / "captum-relp-run.json").read_text())
    assert manifest["settings"]["resume"] is True


@pytest.mark.parametrize("command", ["attribute", "ioi"])
def test_resume_with_another_configuration_is_refused(command, tmp_path, monkeypatch, capsys):
    task = _task_file(tmp_path / "pairs.csv")
    out = tmp_path / "out"
    _count_calls(monkeypatch, raise_at=4)
    with pytest.raises(KeyboardInterrupt):
        main(_argv(command, task, out))
    monkeypatch.undo()
    saved = sorted(p.name for p in (out / CHECKPOINTS).iterdir())
    capsys.readouterr()
    calls = _count_calls(monkeypatch)
    assert main(_argv(command, task, out, "--resume", "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert "--resume: the checkpoint in" in err and "another configuration" in err
    assert "seed 0 there, 3 now" in err
    assert calls == []  # refused before any scoring
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == saved  # the checkpoint is kept as it was
    # --overwrite without --resume discards it and starts again
    assert main(_argv(command, task, out, "--seed", "3", "--overwrite")) == 0
    assert "discarded the checkpoint" in capsys.readouterr().err
    assert not (out / CHECKPOINTS).exists()


def test_resume_without_a_checkpoint_starts_from_the_first_batch(tmp_path, capsys):
    task = _task_file(tmp_path / "pairs.csv", n=4)
    assert main(_argv("attribute", task, tmp_path / "out", "--resume")) == 0
    assert "no checkpoint in" in capsys.readouterr().err
