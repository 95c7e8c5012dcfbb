"""``--rules calibrated`` saves the calibration next to the results; ``--rules PATH.json`` reuses it.

Each command runs twice on the shipped tiny model: once calibrating (the file is written and holds
the pairs, the evidence and the choice), once reading the file with calibration made impossible
(``calibrate_rules`` raises): the calibrated method's saved scores must be the same, value by value.
A file for another kind of model, a corrupt file and a missing file are usage errors naming ``--rules``.
"""
import json
import warnings

import numpy as np
import pytest

from captum_relp import CalibratedRules
from captum_relp.calibration import calibrated_ioi_rules
from captum_relp.cli import EXIT_USAGE, main
from captum_relp.embedded import load_embedded
from captum_relp.tasks import generate_ioi_pairs

TOL = 1e-6
FAST = ["--device", "cpu", "--quiet", "--no-plots"]


def _run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small calibration sets warn about undecided groups
        return main(argv + FAST)


def _no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a calibration ran although --rules named a calibration file")

    monkeypatch.setattr("captum_relp.calibration.calibrate.calibrate_rules", refuse)


def _check_file(path, n_pairs, model):
    """The saved file loads for ``model`` and holds the pairs, each candidate's evidence and the choice."""
    rules = CalibratedRules.load(path, model=load_embedded(model)[0])
    pairs = rules.info["calibration_pairs"]
    assert len(pairs) == n_pairs == rules.n_examples
    assert all(p["clean"] and p["corrupt"] and p["clean"] != p["corrupt"] for p in pairs)
    assert rules.info["model"] == model
    assert set(rules.selection) == set(rules.choices) == {"resid", "attn", "mlp"}
    for group, sel in rules.selection.items():
        assert sel["choice"] == rules.choices[group] and sel["decision"] in ("default", "chosen", "undecided")
        assert set(sel["agreement"]) == set(sel["interval"]) == set(rules.candidates)
        for name, value in sel["agreement"].items():
            low, high = sel["interval"][name]
            assert low - 1e-9 <= value <= high + 1e-9
    return rules


def _close(a, b):
    """Nested JSON values equal, numbers to ``TOL``."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= TOL, (a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def gpt2_rules_file(tmp_path_factory):
    """A calibration file of tiny-gpt2-ioi (a GPT-2), for refusing it on tiny-llama-ioi (a Llama)."""
    model, tok = load_embedded("tiny-gpt2-ioi")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rules = calibrated_ioi_rules(model, tok, n_prompts=3)
    path = tmp_path_factory.mktemp("rules") / "gpt2_calibration.json"
    rules.save(path)
    return path


def _task_file(path, n=8):
    """A task file of IOI pairs the tiny tokenizer knows (answers as strings)."""
    _, tok = load_embedded("tiny-gpt2-ioi")
    rows = [{"clean": p.clean_prompt, "corrupted": p.corrupt_prompt, "answer": " " + p.io_name, "foil": " " + p.s_name}
            for p in generate_ioi_pairs(n, seed=7, templates=(0,), tokenizer=tok)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def test_ioi_saves_the_calibration_and_reuses_it(tmp_path, monkeypatch, capsys):
    common = ["ioi", "--model", "tiny-gpt2-ioi", "--n-prompts", "4", "--batch-size", "4"]
    assert _run(common + ["--rules", "relp,calibrated", "--calibration-prompts", "4", "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "ioi_calibration.json"
    first = json.loads((tmp_path / "a" / "ioi_results.json").read_text())
    assert first["config"]["calibration"]["file"] == "ioi_calibration.json"
    assert not first["config"]["calibration"]["loaded"] and first["config"]["calibration"]["seconds"] > 0
    rules = _check_file(saved, 4, "tiny-gpt2-ioi")
    evaluated = {p.clean_prompt for p in generate_ioi_pairs(4, seed=0, tokenizer=load_embedded("tiny-gpt2-ioi")[1])}
    assert not evaluated & {p["clean"] for p in rules.info["calibration_pairs"]}  # separate pairs
    assert "saved as ioi_calibration.json" in capsys.readouterr().out

    _no_calibration(monkeypatch)
    assert _run(common + ["--rules", f"relp,{saved}", "--out", str(tmp_path / "b")]) == 0
    assert "read from" in capsys.readouterr().out and not (tmp_path / "b" / "ioi_calibration.json").exists()
    second = json.loads((tmp_path / "b" / "ioi_results.json").read_text())
    assert second["config"]["calibration"]["file"] == str(saved) and second["config"]["calibration"]["loaded"]
    assert second["config"]["calibration"]["choices"] == first["config"]["calibration"]["choices"]
    for key in ("mean_maps", "pcc_per_prompt", "pcc_mean_map"):
        _close(first[key], second[key])
    assert first["mean_maps"]["RelP (calibrated)"] != first["mean_maps"]["RelP"] or \
        set(rules.choices.values()) == {"relp"}


def test_attribute_task_file_saves_line_numbers_and_reuses_the_file(tmp_path, monkeypatch):
    task, rows = _task_file(tmp_path / "pairs.jsonl")
    common = ["attribute", "--task", str(task), "--model", "tiny-gpt2-ioi", "--n-prompts", "4", "--no-linearity"]
    assert _run(common + ["--rules", "calibrated", "--calibration-prompts", "4", "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "task_calibration.json"
    rules = _check_file(saved, 4, "tiny-gpt2-ioi")
    # the rows after the 4 evaluated ones: lines 5 to 8 of the file, with their prompts
    assert [p["line"] for p in rules.info["calibration_pairs"]] == [5, 6, 7, 8]
    assert [(p["clean"], p["corrupt"]) for p in rules.info["calibration_pairs"]] == \
        [(r["clean"], r["corrupted"]) for r in rows[4:8]]
    first = json.loads((tmp_path / "a" / "task_results.json").read_text())
    assert first["config"]["calibration"]["file"] == "task_calibration.json"

    _no_calibration(monkeypatch)
    assert _run(common + ["--rules", str(saved), "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "task_results.json").read_text())
    assert second["config"]["calibration"]["file"] == str(saved) and second["config"]["calibration"]["loaded"]
    a, b = np.load(tmp_path / "a" / "task_scores.npz"), np.load(tmp_path / "b" / "task_scores.npz")
    for kind in ("resid", "attn", "mlp"):
        key = f"RelP (calibrated)/{kind}"
        assert a[key].shape == b[key].shape == (4,) + a[key].shape[1:]
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=TOL)
    _close(first["agreement_with_ap"], second["agreement_with_ap"])


def test_circuit_writes_one_file_per_setting_and_reuses_one(tmp_path, monkeypatch):
    common = ["circuit", "--task", "ioi", "--nodes", "components", "--method", "relp", "--n-train", "4",
              "--n-test", "4"]
    assert _run(common + ["--rules", "calibrated", "--calibration-prompts", "4", "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "circuit_calibration_template_1.json"
    rules = _check_file(saved, 4, "tiny-gpt2-ioi")
    assert rules.info["setting"] == "template_1"
    first = json.loads((tmp_path / "a" / "circuit_results.json").read_text())
    assert first["config"]["calibration"]["template_1"]["file"] == saved.name

    _no_calibration(monkeypatch)
    assert _run(common + ["--rules", str(saved), "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "circuit_results.json").read_text())
    assert second["config"]["calibration"]["template_1"]["file"] == str(saved)
    _close(first["curves"], second["curves"])
    _close(first["denominators"], second["denominators"])


def test_edges_saves_the_calibration_and_reuses_it(tmp_path, monkeypatch):
    common = ["edges", "--model", "tiny-gpt2-ioi", "--method", "relp", "--no-exact", "--n-prompts", "3",
              "--repeats", "1"]
    assert _run(common + ["--rules", "calibrated", "--calibration-prompts", "4", "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "edges_calibration.json"
    _check_file(saved, 4, "tiny-gpt2-ioi")
    first = json.loads((tmp_path / "a" / "edges_results.json").read_text())
    assert first["meta"]["calibration"]["file"] == "edges_calibration.json"

    _no_calibration(monkeypatch)
    assert _run(common + ["--rules", str(saved), "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "edges_results.json").read_text())
    assert second["meta"]["calibration"]["file"] == str(saved) and second["meta"]["calibration"]["loaded"]
    assert len(first["calibrated"]["scores"]) == len(second["calibrated"]["scores"]) > 100
    for key in ("scores", "curve", "cpr", "cmd"):
        _close(first["calibrated"][key], second["calibrated"][key])


COMMANDS = {
    "attribute": ["attribute", "--n-prompts", "2"],
    "ioi": ["ioi", "--n-prompts", "2"],
    "circuit": ["circuit", "--task", "ioi", "--nodes", "components", "--method", "relp", "--n-train", "2",
                "--n-test", "2"],
    "edges": ["edges", "--method", "relp", "--no-exact", "--n-prompts", "2", "--repeats", "1"],
}


def _argv(command, tmp_path):
    argv = list(COMMANDS[command])
    if command == "attribute":
        argv[1:1] = ["--task", str(_task_file(tmp_path / "pairs.jsonl")[0])]
    return argv + ["--out", str(tmp_path / "out")]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_file_for_another_kind_of_model_is_refused(command, gpt2_rules_file, tmp_path, monkeypatch, capsys):
    _no_calibration(monkeypatch)
    rules = f"relp,{gpt2_rules_file}" if command in ("attribute", "ioi") else str(gpt2_rules_file)
    code = _run(_argv(command, tmp_path) + ["--model", "tiny-llama-ioi", "--rules", rules])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert f"--rules {gpt2_rules_file}: calibrated for another model" in err and "GPT2LMHeadModel" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_corrupt_or_missing_file_is_refused_before_the_model_loads(command, gpt2_rules_file, tmp_path,
                                                                      monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although --rules was unusable")

    monkeypatch.setattr("captum_relp.embedded.load_model", no_model)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(gpt2_rules_file.read_text()[:200])
    wrong = tmp_path / "wrong.json"
    data = json.loads(gpt2_rules_file.read_text())
    data["choices"]["mlp"] = "no-such-candidate"
    wrong.write_text(json.dumps(data))
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for target, says in ((truncated, "not valid JSON"), (wrong, "field choices['mlp']"),
                         (tmp_path / "missing.json", "no such file"), (folder, "not a file")):
        code = _run(_argv(command, tmp_path) + ["--rules", str(target)])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, err
        assert f"--rules {target}: " in err and says in err, err


@pytest.mark.parametrize("argv, says", [
    (["ioi", "--rules", "calibrated,x.json"], "one source of calibrated rules"),
    (["attribute", "--task", "t.csv", "--rules", "a.json,b.json"], "one source of calibrated rules"),
    (["ioi", "--rules", "relp,magic"], "at most one calibration file"),
    (["circuit", "--rules", "magic"], "preset, calibrated or a calibration file (.json)"),
    (["edges", "--rules", "calibrated.txt"], "preset, calibrated or a calibration file (.json)"),
])
def test_bad_rules_values(argv, says, capsys):
    assert main(argv + ["--quiet"]) == EXIT_USAGE
    assert says in capsys.readouterr().err
