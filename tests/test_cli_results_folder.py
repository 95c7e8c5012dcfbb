"""A results folder holds exactly one run: an interrupted or failed run leaves the earlier one untouched."""
import json
from pathlib import Path

import pytest

import captum_relp.plotting as plotting
from captum_relp.cli import main
from captum_relp.cli._results import CHECKPOINTS

# tiny settings: each run takes seconds on the shipped model
RUNS = {
    "ioi": (["ioi", "--n-prompts", "2", "--batch-size", "2", "--methods", "atp,relp"], "plot_patching_heatmaps"),
    "circuit": (["circuit", "--task", "sva", "--nodes", "components", "--method", "relp", "--n-train", "3",
                 "--n-test", "3"], "plot_faithfulness"),
    "edges": (["edges", "--method", "relp", "--no-exact", "--n-prompts", "2", "--repeats", "1",
               "--fractions", "0,0.5,1"], "plot_edge_circuit"),
}


def _argv(command: str, out: Path, *extra: str) -> list:
    return RUNS[command][0] + ["--device", "cpu", "--quiet", "--threads", "1", "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative name -> bytes) but the checkpoint of an unfinished run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and CHECKPOINTS not in p.relative_to(folder).parts}


def _checkpointed(folder: Path) -> int:
    """The finished batch results kept in ``folder``'s checkpoint."""
    return len(list((folder / CHECKPOINTS).glob("*.npz")))


def _interrupt_on_call(monkeypatch, name: str, call: int, error: BaseException) -> None:
    """``plotting.<name>`` raises ``error`` on its ``call``-th call (the earlier calls draw as usual)."""
    real, calls = getattr(plotting, name), []

    def plot(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(plotting, name, plot)


@pytest.mark.parametrize("command", sorted(RUNS))
def test_interrupted_overwrite_leaves_the_earlier_run(command, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    assert main(_argv(command, out)) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    capsys.readouterr()
    # the second run writes its JSON (and for ioi/edges a first figure) before Ctrl-C arrives
    _interrupt_on_call(monkeypatch, RUNS[command][1], 1 if command == "circuit" else 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        main(_argv(command, out, "--seed", "1", "--overwrite"))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging folder left
    err = capsys.readouterr().err
    assert f"interrupted: the earlier results in {out} are left unchanged" in err
    # ioi checkpoints its batches (2 methods, 1 batch): the same command with --resume continues
    assert _checkpointed(out) == (2 if command == "ioi" else 0)
    assert ("finished batch results are kept" in err) == (command == "ioi")


def test_failed_run_without_earlier_results_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "results"
    _interrupt_on_call(monkeypatch, "plot_faithfulness", 1, RuntimeError("the plot broke"))
    with pytest.raises(RuntimeError, match="the plot broke"):
        main(_argv("circuit", out))
    assert list(tmp_path.iterdir()) == []  # neither --out nor the folders made for it remain
    assert f"failed: nothing was written to {out}" in capsys.readouterr().err


def test_failed_overwrite_into_an_existing_folder_keeps_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    assert main(_argv("ioi", out, "--no-plots")) == 0
    before = _snapshot(out)
    _interrupt_on_call(monkeypatch, "plot_patching_heatmaps", 3, RuntimeError("the plot broke"))
    with pytest.raises(RuntimeError):
        main(_argv("ioi", out, "--seed", "1", "--overwrite"))
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert f"failed: the earlier results in {out} are left unchanged" in capsys.readouterr().err


def test_overwrite_leaves_exactly_the_new_run(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(_argv("ioi", out)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "pairs.txt").write_text("mine too")
    capsys.readouterr()
    assert main(_argv("ioi", out, "--seed", "1", "--no-plots", "--overwrite")) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "captum-relp-run.json").read_text())
    assert manifest["files"] == ["ioi_results.json", "ioi_pcc.csv", "ioi_scores.npz"]
    assert manifest["settings"]["out"] == str(out)
    assert sorted(_snapshot(out)) == ["captum-relp-run.json", "data/pairs.txt", "ioi_pcc.csv", "ioi_results.json",
                                      "ioi_scores.npz", "notes.txt"]
    assert json.loads((out / "ioi_results.json").read_text())["config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "pairs.txt").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    # printed and recorded paths are the final ones, never the staging folder's
    assert f"wrote {out / 'ioi_results.json'}, {out / 'ioi_pcc.csv'}" in printed
    assert f"removed the earlier run's {out / 'ioi_heatmap_attn.png'}" in printed
    for name in ("captum-relp-run.json", "ioi_results.json"):
        assert "captum-relp-staging" not in (out / name).read_text()


def test_run_into_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_argv("ioi", Path("."), "--no-plots")) == 0
    assert main(_argv("ioi", Path("."), "--no-plots", "--seed", "1", "--overwrite")) == 0
    assert Path.cwd() == tmp_path and (tmp_path / "ioi_results.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captum-relp-run.json", "ioi_pcc.csv", "ioi_results.json",
                                                           "ioi_scores.npz"]
    assert f"wrote {Path('ioi_results.json')}" in capsys.readouterr().out


def test_a_failed_move_is_undone(tmp_path, monkeypatch, capsys):
    import captum_relp.cli._results as results

    out = tmp_path / "results"
    assert main(_argv("ioi", out)) == 0
    before = _snapshot(out)
    real, moves = results.os.replace, []

    def replace(source, target):
        moves.append(target)
        if Path(target).parent == out and len([m for m in moves if Path(m).parent == out]) == 2:
            raise OSError(28, "No space left on device")  # the second new file cannot be moved in
        real(source, target)

    monkeypatch.setattr(results.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        main(_argv("ioi", out, "--seed", "1", "--no-plots", "--overwrite"))
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert "failed: the earlier results in" in capsys.readouterr().err
    assert _checkpointed(out) == 2  # both methods' batch, for --resume


def test_ctrl_c_while_files_move_is_held_until_they_are_in(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import captum_relp.cli._results as results

    out = tmp_path / "results"
    assert main(_argv("ioi", out)) == 0
    real = results.os.replace

    def replace(source, target):
        if CHECKPOINTS not in Path(target).parts:  # Ctrl-C at every move of the results
            os.kill(os.getpid(), signal.SIGINT)
        real(source, target)

    monkeypatch.setattr(results.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        main(_argv("ioi", out, "--seed", "1", "--no-plots", "--overwrite"))
    assert sorted(_snapshot(out)) == ["captum-relp-run.json", "ioi_pcc.csv", "ioi_results.json", "ioi_scores.npz"]
    assert json.loads((out / "ioi_results.json").read_text())["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert "interrupted after the new results were written" in capsys.readouterr().err
    assert not (out / CHECKPOINTS).exists()  # the results are in: the checkpoint is gone


def test_ctrl_c_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import captum_relp.cli.ioi as ioi

    def experiment(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ioi, "run_ioi_experiment", experiment)
    out = tmp_path / "a" / "results"
    with pytest.raises(KeyboardInterrupt):
        main(_argv("ioi", out))
    assert list(tmp_path.iterdir()) == []
    assert f"interrupted: nothing was written to {out}" in capsys.readouterr().err


def test_staged_inside_out_when_its_parent_cannot_be_written(tmp_path, monkeypatch, capsys):
    import captum_relp.cli._results as results

    out = tmp_path / "results"
    assert main(_argv("ioi", out)) == 0
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(results, "_can_write", lambda folder: folder != tmp_path.resolve())
    assert results.staging_parent(out) == out.resolve()
    staged = []
    real_save = results.write_manifest

    def write_manifest(folder, *args):
        staged.append(folder)
        return real_save(folder, *args)

    monkeypatch.setattr(results, "write_manifest", write_manifest)
    assert main(_argv("ioi", out, "--seed", "1", "--no-plots", "--overwrite")) == 0
    assert staged[0].parent == out.resolve()
    assert sorted(_snapshot(out)) == ["captum-relp-run.json", "ioi_pcc.csv", "ioi_results.json", "ioi_scores.npz",
                                      "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_results_another_run_wrote_meanwhile_are_not_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    real = plotting.plot_faithfulness

    def plot(*args, **kwargs):  # while this run writes, another run's results land in --out
        out.mkdir(exist_ok=True)
        (out / "circuit_results.json").write_text("the other run's")
        return real(*args, **kwargs)

    monkeypatch.setattr(plotting, "plot_faithfulness", plot)
    assert main(_argv("circuit", out)) == 1
    assert _snapshot(out) == {"circuit_results.json": b"the other run's"}
    err = capsys.readouterr().err
    assert f"--out {out} received another run's results while this run ran" in err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".captum-relp-staging-results-")]
    assert len(kept) == 1 and str(kept[0]) in err
    assert sorted(p.name for p in kept[0].iterdir()) == ["captum-relp-run.json", "circuit_faithfulness.png",
                                                         "circuit_results.json"]


def test_the_error_is_printed_before_what_the_folder_kept(tmp_path, capsys):
    """A usage error inside a run (a calibration file of another kind of model, found once the model is
    loaded): its message first, then the folder's status, each once."""
    import warnings

    from captum_relp.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two calibration pairs leave groups undecided
        assert main(["ioi", "--model", "tiny-gpt2-ioi", "--n-prompts", "2", "--methods", "atp,relp", "--rules",
                     "relp,calibrated", "--calibration-prompts", "3", "--out", str(tmp_path / "gpt2"), "--quiet",
                     "--no-plots"]) == 0
    capsys.readouterr()
    code = main(["ioi", "--model", "tiny-llama-ioi", "--n-prompts", "2", "--methods", "atp,relp", "--rules",
                 f"relp,{tmp_path / 'gpt2' / 'ioi_calibration.json'}", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    errors = [i for i, line in enumerate(err) if line.startswith("captum-relp: error: ")]
    status = [i for i, line in enumerate(err) if "written to" in line or "left unchanged" in line]
    assert code != 0 and len(errors) == 1 and "another model" in err[errors[0]], err
    assert status and all(errors[0] < i for i in status), err
