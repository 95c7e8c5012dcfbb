"""``--calibration-default`` in every command that calibrates, and what every command prints of a calibration.

The option reaches the calibration: the saved file records it as its ``default``, and every component
type the calibration pairs could not move off the default keeps it; on the same pairs another default
gives other choices. Given to a run that does not calibrate, it is a usage error naming it.
"""
import argparse
import json
import warnings

import pytest

from captum_relp import CalibratedRules
from captum_relp.cli import EXIT_ERROR, EXIT_USAGE, build_parser, main
from captum_relp.cli._common import CALIBRATION_DEFAULTS
from captum_relp.embedded import load_embedded
from captum_relp.tasks import generate_ioi_pairs

FAST = ["--device", "cpu", "--quiet", "--no-plots"]
KEPT = ("default", "undecided", "no-effect")
"""Decisions that keep the default (the pairs did not show another candidate beats it)."""


def _run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration pairs leave groups undecided
        return main(argv + FAST)


def _task_file(path, n=8, same_from=None):
    """IOI pairs the tiny tokenizers know; rows from ``same_from`` on have clean == corrupted."""
    _, tok = load_embedded("tiny-gpt2-ioi")
    rows = [{"clean": p.clean_prompt, "corrupted": p.corrupt_prompt, "answer": " " + p.io_name, "foil": " " + p.s_name}
            for p in generate_ioi_pairs(n, seed=7, templates=(0,), tokenizer=tok)]
    for row in rows[n if same_from is None else same_from:]:
        row["corrupted"] = row["clean"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


COMMANDS = {  # the command, and the calibration file it saves
    "attribute": (["attribute", "--n-prompts", "4", "--no-linearity", "--rules", "calibrated"], "task_calibration.json"),
    "ioi": (["ioi", "--model", "tiny-llama-ioi", "--n-prompts", "4", "--batch-size", "4", "--methods", "atp,relp",
             "--rules", "relp,calibrated"], "ioi_calibration.json"),
    "circuit": (["circuit", "--task", "ioi", "--nodes", "components", "--method", "relp", "--n-train", "4",
                 "--n-test", "4", "--rules", "calibrated"], "circuit_calibration_template_1.json"),
    "edges": (["edges", "--method", "relp", "--no-exact", "--n-prompts", "3", "--repeats", "1",
               "--rules", "calibrated"], "edges_calibration.json"),
}


def _argv(command, tmp_path, *extra):
    argv = list(COMMANDS[command][0])
    if command == "attribute":
        argv[1:1] = ["--task", str(_task_file(tmp_path / "pairs.jsonl"))]
    return argv + ["--calibration-prompts", "4", *extra]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_default_reaches_the_calibration_and_the_whole_summary_is_printed(command, tmp_path, capsys):
    assert _run(_argv(command, tmp_path, "--calibration-default", "relp-ah", "--out", str(tmp_path / "out"))) == 0
    saved = tmp_path / "out" / COMMANDS[command][1]
    rules = CalibratedRules.load(saved)
    assert rules.default == json.loads(saved.read_text())["default"] == "relp-ah"
    for group, selection in rules.selection.items():  # each choice measured against relp-ah
        assert (selection["decision"] in KEPT) == (rules.choices[group] == "relp-ah"), (group, selection)
        assert "'relp-ah'" in selection["note"], (group, selection)
    # printed: the whole summary, down to its last line, the cost
    summary = rules.summary()
    assert summary.splitlines()[-1].startswith("cost: ") and "default 'relp-ah'" in summary
    printed = capsys.readouterr()
    assert summary in printed.out
    # an undecided group is in the printed summary, not repeated on stderr as a Python warning
    assert "CalibrationWarning" not in printed.err and "cannot decide" not in printed.err
    manifest = json.loads((tmp_path / "out" / "captum-relp-run.json").read_text())
    assert manifest["settings"]["calibration_default"] == "relp-ah"


def test_another_default_changes_the_choice_on_the_same_pairs(tmp_path):
    """tiny-gpt2-ioi, 4 pairs: the best preset of MLP outputs is relp and no candidate beats it beyond
    the noise; from the gradient, ln does. Without the option the default is the best preset."""
    choices = {}
    for default in ("gradient", None):
        out = tmp_path / str(default)
        extra = ["--calibration-default", default] if default else []
        assert _run(_argv("attribute", tmp_path, *extra, "--out", str(out))) == 0
        rules = CalibratedRules.load(out / "task_calibration.json")
        assert rules.default == (default or "best-preset")
        assert json.loads((out / "task_results.json").read_text())["config"]["calibration"]["default"] == rules.default
        choices[default] = rules.choices
    assert choices["gradient"]["mlp"] == "ln" and choices[None]["mlp"] == "relp"


@pytest.mark.parametrize("argv, rules", [
    (["attribute", "--task", "pairs.jsonl"], "relp"),
    (["attribute", "--task", "pairs.jsonl", "--rules", "relp,saved.json"], "relp,saved.json"),
    (["ioi", "--rules", "relp,relp-ah"], "relp,relp-ah"),
    (["ioi", "--rules", "saved.json"], "saved.json"),
    (["circuit"], "preset"),
    (["circuit", "--rules", "saved.json"], "saved.json"),
    (["edges"], "preset"),
    (["edges", "--rules", "saved.json"], "saved.json"),
])
def test_the_default_without_a_calibration_is_a_usage_error(argv, rules, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the arguments are unusable")

    monkeypatch.setattr("captum_relp.embedded.load_model", no_model)
    assert main(argv + ["--calibration-default", "gradient", "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--calibration-default applies only when the run calibrates (--rules calibrated); " in err
    assert f"(--rules {rules})" in err
    assert ("reuses a calibration file" in err) == rules.endswith(".json")


def test_an_unknown_default_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["ioi", "--rules", "calibrated", "--calibration-default", "ln"])
    assert stop.value.code == EXIT_USAGE
    assert "--calibration-default: invalid choice: 'ln'" in capsys.readouterr().err


def test_every_command_that_calibrates_takes_the_option_with_its_help():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        options = {flag: action for action in parser._actions for flag in action.option_strings}
        assert ("--calibration-default" in options) == ("--calibration-prompts" in options) == True, name
        action = options["--calibration-default"]
        assert tuple(action.choices) == CALIBRATION_DEFAULTS and action.default is None
        text = " ".join(parser.format_help().split())
        assert "best-preset: whichever of gradient (plain gradients, as AtP), relp (the paper's rules) and " \
               "relp-ah (relp with the AH-rule) agrees best" in text, name
        assert "(default: best-preset)" in text and "(default: None)" not in text.split("--calibration-default")[1]


@pytest.mark.parametrize("command", ["attribute", "circuit", "edges"])
def test_a_calibration_that_cannot_run_is_a_clean_error(command, tmp_path, capsys):
    """Calibration rows with clean == corrupted: no effect to calibrate on (task files; IOI pairs always differ)."""
    task = _task_file(tmp_path / "pairs.jsonl", n=8, same_from=4)
    argv = {"attribute": ["attribute", "--task", str(task), "--n-prompts", "4", "--no-linearity",
                          "--rules", "calibrated", "--calibration-prompts", "4"],
            # circuit calibrates on the first training rows: make them the identical ones
            "circuit": ["circuit", "--task", str(_task_file(tmp_path / "first.jsonl", n=8, same_from=0)),
                        "--nodes", "components", "--method", "relp", "--n-train", "4", "--n-test", "4",
                        "--rules", "calibrated", "--calibration-prompts", "4"],
            "edges": ["edges", "--task", str(task), "--method", "relp", "--no-exact", "--n-prompts", "2",
                      "--n-eval", "2", "--repeats", "1", "--rules", "calibrated", "--calibration-prompts", "4"],
            }[command]
    code = _run(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR, err
    assert "captum-relp: error: --rules calibrated: cannot calibrate on " in err
    assert "there is no effect to calibrate on" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    if command != "circuit":
        assert f"the 4 calibration rows of {task} (lines 5-8)" in err


@pytest.mark.parametrize("command", ["attribute", "ioi"])
def test_resume_needs_the_same_default(command, tmp_path, monkeypatch, capsys):
    """The checkpoint's fingerprint records the default of a run that calibrates."""
    from captum_relp.attr.methods import Method
    from captum_relp.cli._results import CHECKPOINTS

    real, calls = Method.attribute, []

    def interrupted(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 3:  # the second batch
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    base = {"attribute": ["attribute", "--task", str(_task_file(tmp_path / "pairs.jsonl")), "--n-prompts", "4",
                          "--no-linearity", "--rules", "calibrated"],
            "ioi": ["ioi", "--n-prompts", "4", "--methods", "atp,relp", "--rules", "calibrated"]}[command]
    argv = base + ["--calibration-prompts", "4", "--batch-size", "2", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(Method, "attribute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(argv + ["--calibration-default", "gradient"])
    monkeypatch.undo()
    assert (tmp_path / "out" / CHECKPOINTS).is_dir()
    capsys.readouterr()
    for other in ([], ["--calibration-default", "relp"]):  # best-preset, then relp
        assert _run(argv + ["--resume", *other]) == EXIT_USAGE
        err = capsys.readouterr().err
        now = other[-1] if other else "best-preset"
        assert 'error: --resume: the checkpoint in ' in err and f'calibration_default "gradient" there, "{now}" now' in err
    assert _run(argv + ["--resume", "--calibration-default", "gradient"]) == 0
    assert CalibratedRules.load(tmp_path / "out" / COMMANDS[command][1]).default == "gradient"


def test_methods_with_a_task_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """A task file always runs AP, AtP and RelP: ``--methods`` would be ignored, so it is refused."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the arguments are unusable")

    monkeypatch.setattr("captum_relp.embedded.load_model", no_model)
    task = _task_file(tmp_path / "pairs.jsonl")
    assert main(["attribute", "--task", str(task), "--methods", "atp,relp", "--quiet"]) == EXIT_USAGE
    assert "--methods applies only to --task ioi" in capsys.readouterr().err


@pytest.mark.parametrize("command, default", [("attribute", "best-preset")])
def test_an_undecided_group_is_reported_once_in_the_summary(command, default, tmp_path, capsys):
    """Few calibration pairs leave a group undecided: its note is in the printed summary, and the
    command does not also emit it as a Python warning (file path and source line on stderr)."""
    from captum_relp.calibration import CalibrationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_argv(command, tmp_path, "--calibration-default", default, "--out", str(tmp_path / "out"))
                    + FAST) == 0
    rules = CalibratedRules.load(tmp_path / "out" / COMMANDS[command][1])
    assert any(s["decision"] == "undecided" for s in rules.selection.values())  # the case exists
    assert "cannot decide" in capsys.readouterr().out
    assert not [w for w in caught if issubclass(w.category, CalibrationWarning)]


def test_the_calibration_step_of_every_experiment_keeps_warnings_for_the_summary():
    """``calibrating`` (used by the ioi, task, circuit and edges experiments) silences the warning the
    summary already holds, lets other warnings through and names the pairs of a failure."""
    from captum_relp.calibration import CalibrationWarning
    from captum_relp.experiments.calibration_record import CalibrationFailed, calibrating

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with calibrating("4 pairs"):
            warnings.warn("undecided", CalibrationWarning)
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    with pytest.raises(CalibrationFailed, match="cannot calibrate on 4 pairs: no effect"):
        with calibrating("4 pairs"):
            raise ValueError("no effect")
