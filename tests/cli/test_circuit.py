"""``captum-relp circuit``: calibrated rules (``--rules calibrated`` or a file) are used by RelP only,
so a ``--method`` without RelP is refused before the model loads instead of ignoring them."""
import pytest

from captum_relp.cli import EXIT_USAGE, main


@pytest.mark.parametrize("methods", ["atp,ig", "RelP+AH", "relp-ah,atp"])
@pytest.mark.parametrize("rules", ["calibrated", "saved.json"])
def test_calibrated_rules_without_relp_are_refused(methods, rules, monkeypatch, capsys, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although --rules has no effect")

    monkeypatch.setattr("captum_relp.embedded.load_model", no_model)
    code = main(["circuit", "--method", methods, "--rules", rules, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert f"--rules {rules}: calibrated rules are used by RelP, which --method {methods} does not run; " \
           "add RelP to --method" in err
    assert not (tmp_path / "out").exists()


def test_the_experiment_refuses_them_too():
    from captum_relp.embedded import load_embedded
    from captum_relp.experiments.circuits import run_circuit_experiment

    model, tokenizer = load_embedded()
    with pytest.raises(ValueError, match=r"calibrated rules are used by RelP only, and methods \['AtP'\] has no RelP"):
        run_circuit_experiment(model, tokenizer, "ioi", methods=["AtP"], nodes="components", n_train=2, n_test=2,
                               calibration_prompts=2, show_progress=False)
