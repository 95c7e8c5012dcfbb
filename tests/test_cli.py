"""captum-relp CLI end to end, on a local model directory (the hub path is the same code)."""
import json
import subprocess
import sys

import pytest

from captum_relp.cli import EXIT_TASK, EXIT_USAGE, main


def test_ioi_on_local_directory(saved_tiny_model, tmp_path, capsys):
    code = main(["ioi", "--model", str(saved_tiny_model), "--n-prompts", "4", "--batch-size", "2",
                 "--rules", "relp,relp-ah", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Pearson correlation with activation patching" in out and "RelP+AH" in out
    summary = json.loads((tmp_path / "ioi_results.json").read_text())
    assert summary["config"]["n_prompts"] == 4
    assert (tmp_path / "ioi_heatmap_resid.png").exists()


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["ioi", "--model", str(missing), "--quiet"]) == EXIT_USAGE
    assert "cannot load model" in capsys.readouterr().err


def test_tokenizer_splitting_every_name(tmp_path, capsys):
    from tests.conftest import ioi_tokenizer, tiny_lm

    tokenizer = ioi_tokenizer(drop_names=True)
    tiny_lm(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["ioi", "--model", str(tmp_path), "--n-prompts", "2", "--quiet"]) == EXIT_TASK
    assert "cannot build IOI prompts" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ioi", "--rules", "magic"], ["ioi", "--n-prompts", "0"]])
def test_bad_arguments(argv, capsys):
    assert main(argv) == EXIT_USAGE


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "captum_relp.cli", "ioi", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--n-prompts" in done.stdout


def test_out_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for command in (["ioi"], ["circuit", "--nodes", "components"]):
        assert main(command + ["--out", str(existing), "--quiet"]) == EXIT_USAGE
        assert "is not a directory" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


def test_corrupt_weights_are_a_load_error(saved_tiny_model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["ioi", "--model", str(broken), "--quiet"]) == EXIT_USAGE
    assert "cannot load model" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["circuit", "--n-train", "0"], ["circuit", "--n-test", "-3"]])
def test_non_positive_counts(argv, capsys):
    assert main(argv) == EXIT_USAGE
    assert "must be >= 1" in capsys.readouterr().err


def test_unknown_names_fail_fast_with_a_suggestion(tmp_path, capsys):
    assert main(["ioi", "--model", "tiny-gpt2", "--quiet"]) == EXIT_USAGE
    assert "did you mean 'tiny-gpt2-ioi'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ioi", "--model", str(empty), "--quiet"]) == EXIT_USAGE
    assert "has no config.json" in capsys.readouterr().err


def test_no_arguments_prints_help(capsys):
    assert main([]) == EXIT_USAGE
    assert "usage: captum-relp" in capsys.readouterr().out


def test_ioi_with_calibrated_rules(saved_tiny_model, tmp_path, capsys):
    code = main(["ioi", "--model", str(saved_tiny_model), "--n-prompts", "4", "--batch-size", "4",
                 "--rules", "relp,calibrated", "--calibration-prompts", "3", "--out", str(tmp_path),
                 "--quiet", "--device", "cpu", "--no-plots"])
    assert code == 0
    out = capsys.readouterr().out
    assert "RelP (calibrated)" in out and "calibrated rules (3 separate pairs" in out
    summary = json.loads((tmp_path / "ioi_results.json").read_text())
    assert set(summary["config"]["calibration"]["choices"]) == {"resid", "attn", "mlp"}
    assert "RelP (calibrated)" in summary["pcc_per_prompt"]["mlp"]


def test_circuit_states_cost_up_front_and_progress_per_method(tmp_path, capsys):
    code = main(["circuit", "--model", "tiny-gpt2-ioi", "--nodes", "components", "--method", "RelP,AtP",
                 "--n-train", "2", "--n-test", "2", "--batch-size", "2", "--n-steps", "3", "--no-plots",
                 "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    plan = err.index("expected cost of the node effects")
    assert err.index("scoring nodes: RelP 2 forward + 1 backward") < plan < err.index("within_rc: RelP done")
    assert "warning: IG with --nodes features" not in err
    assert "within_rc: AtP done" in err and "across_pp: AtP done" in err
    saved = json.loads((tmp_path / "circuit_results.json").read_text())
    assert saved["config"]["model"] == "tiny-gpt2-ioi"  # not the site-packages path
    assert set(saved["denominators"]) == {"within_rc", "across_rc", "across_pp"}
    from captum_relp.cli.circuit import cost_notice

    assert "warning: IG with --nodes features runs 10 steps" in cost_notice(["RelP", "IG"], "features", 10)
    assert "IG 3 interpolation steps per node group" in cost_notice(["IG"], "components", 3)


def test_threads_option_and_default(monkeypatch):
    import argparse
    import os

    import torch

    from captum_relp.cli import build_parser
    from captum_relp.cli._threads import apply_threads, free_cores

    for command in ("ioi", "circuit", "edges"):
        assert build_parser().parse_args([command, "--threads", "1"]).threads == 1
    assert main(["ioi", "--threads", "0"]) == EXIT_USAGE
    previous = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
        assert free_cores() == 1  # 4 usable cores, 2.6 busy: round(1.4)
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert free_cores() == 1  # never below one
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert free_cores() == 4  # never above the usable cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun, 2 processes here: half each
        assert free_cores() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert free_cores() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert apply_threads(argparse.Namespace(threads=None)) == 4 and torch.get_num_threads() == 4
        assert apply_threads(argparse.Namespace(threads=2)) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_ioi_methods_skip_ap_and_cost_is_stated_first(tmp_path, capsys):
    assert main(["ioi", "--methods", "atp,ap-fast"]) == EXIT_USAGE
    out = tmp_path / "out"
    assert main(["ioi", "--n-prompts", "2", "--methods", "atp,relp", "--no-plots", "--threads", "1",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.index("12 components") < captured.err.index("IOI batches")
    assert "AP:" not in captured.err
    results = json.loads((out / "ioi_results.json").read_text())
    assert set(results["seconds"]) == {"AtP", "RelP"}
    assert all(value != value for value in results["pcc_per_prompt"]["mlp"].values())  # NaN: no AP reference
    assert "AP was not run (methods AtP, RelP)" in captured.out and "nan" not in captured.out.lower()
# --- where results go: --out checked before any work, earlier runs never silently mixed ------------------------

def _fail_if_loaded(monkeypatch):
    """Loading a model means work started: these checks must come first."""
    import captum_relp.cli._common as common

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(common, "load_model", boom, raising=False)
    monkeypatch.setattr("captum_relp.embedded.load_model", boom)


@pytest.mark.parametrize("command", [["ioi"], ["circuit", "--nodes", "components"], ["edges"]])
def test_out_that_cannot_be_created_fails_before_any_work(command, monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    assert main(command + ["--out", "/proc/captum-relp-x", "--quiet"]) == EXIT_USAGE
    assert "--out /proc/captum-relp-x cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["ioi"], ["circuit", "--nodes", "components"], ["edges"]])
def test_directory_of_another_run_is_refused_without_overwrite(command, tmp_path, monkeypatch, capsys):
    (tmp_path / "edges_circuit_eap.png").write_bytes(b"an earlier run's figure")
    (tmp_path / "notes.txt").write_text("mine")
    _fail_if_loaded(monkeypatch)
    assert main(command + ["--out", str(tmp_path), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds the results of another run (edges_circuit_eap.png)" in err and "--overwrite" in err
    assert (tmp_path / "edges_circuit_eap.png").read_bytes() == b"an earlier run's figure"


def test_overwrite_removes_the_earlier_runs_other_files(tmp_path, capsys):
    argv = ["ioi", "--n-prompts", "2", "--batch-size", "2", "--quiet", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    first = json.loads((tmp_path / "captum-relp-run.json").read_text())
    assert first["command"] == "ioi" and "ioi_heatmap_mlp.png" in first["files"]
    (tmp_path / "edges_circuit_eap.png").write_bytes(b"from another model")
    (tmp_path / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv + ["--no-plots"]) == EXIT_USAGE  # a second run into the same directory is refused
    assert main(argv + ["--no-plots", "--overwrite"]) == 0
    out = capsys.readouterr().out
    left = sorted(p.name for p in tmp_path.iterdir())
    # the first run's heatmaps and the stray figure are gone, the user's own file stays
    assert left == ["captum-relp-run.json", "ioi_pcc.csv", "ioi_results.json", "ioi_scores.npz", "notes.txt"]
    assert "removed the earlier run's" in out and "ioi_heatmap_resid.png" in out
    second = json.loads((tmp_path / "captum-relp-run.json").read_text())
    assert second["files"] == ["ioi_results.json", "ioi_pcc.csv", "ioi_scores.npz"]
    assert second["settings"]["no_plots"] is True


def test_result_patterns_cover_every_output():
    import re

    from captum_relp.cli import SUBCOMMANDS
    from captum_relp.cli._common import MANIFEST, RESULT_PATTERNS

    derived = [re.sub(r"\{[^}]*\}|<[^>]*>", "*", name) for command in SUBCOMMANDS for name in command.OUTPUTS]
    assert sorted(RESULT_PATTERNS) == sorted(derived + [MANIFEST])


def test_default_out_names_the_command_task_and_model(monkeypatch, tmp_path, capsys):
    from captum_relp.cli._common import default_out
    from captum_relp.cli import build_parser

    parser = build_parser()
    assert default_out(parser.parse_args(["ioi"]), "ioi") == "relp-out/ioi-tiny-gpt2-ioi"
    assert default_out(parser.parse_args(["edges", "--model", "tiny-llama-ioi"]), "edges") == \
        "relp-out/edges-ioi-tiny-llama-ioi"
    assert default_out(parser.parse_args(["circuit", "--model", "org/Some Model"]), "circuit") == \
        "relp-out/circuit-sva-org--Some-Model"


def test_readme_cli_lines_write_to_different_directories():
    """Running the README's command-line block top to bottom loses no run's results."""
    import re
    import shlex
    from pathlib import Path

    from captum_relp.cli import build_parser
    from captum_relp.cli._common import default_out

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Command line\s+```bash\n(.*?)```", readme, re.S).group(1)
    outs = []
    for line in block.strip().splitlines():
        if not line.startswith("captum-relp "):  # e.g. the one-off fetch script
            continue
        argv = shlex.split(line.split("#")[0])[1:]
        args = build_parser().parse_args(argv)
        outs.append(args.out or default_out(args, argv[0]))
    assert len(outs) >= 4 and len(set(outs)) == len(outs), outs


@pytest.mark.parametrize("fractions, message", [("0,nan,1", "numbers in [0, 1], got 'nan'"),
                                                ("0,1.5,1", "numbers in [0, 1], got '1.5'"),
                                                ("0,x,1", "comma-separated numbers"),
                                                ("0.5,0.1,1", "must increase from 0 to 1")])
def test_edges_bad_fractions_are_a_clean_error(fractions, message, monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    assert main(["edges", "--fractions", fractions, "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("captum-relp: error: --fractions") and message in err and "Traceback" not in err


def _subcommand_helps():
    import argparse

    from captum_relp.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.format_help() for name, sub in subparsers.choices.items()}


def test_help_states_computed_defaults_in_words():
    helps = _subcommand_helps()
    assert set(helps) == {"attribute", "ioi", "circuit", "edges"}
    for name, text in helps.items():
        flat = " ".join(text.split())
        assert "(default: None)" not in flat, name
        assert "default: usable cores minus the current load" in flat, name  # --threads
        assert f"e.g.relp-out/{name}-" in "".join(text.split()), name  # --out names the folder it writes
