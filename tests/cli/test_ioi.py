"""``captum-relp ioi``: calibrated rules (``--rules ...,calibrated`` or a file) are used by RelP only,
so ``--methods`` without relp is refused before the model loads instead of ignoring them."""
import pytest

from captum_relp.cli import EXIT_USAGE, main


@pytest.mark.parametrize("command", [["ioi"], ["attribute", "--task", "ioi"]])
@pytest.mark.parametrize("rules", ["relp,calibrated", "saved.json"])
def test_calibrated_rules_without_relp_are_refused(command, rules, monkeypatch, capsys, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although --rules has no effect")

    monkeypatch.setattr("captum_relp.embedded.load_model", no_model)
    code = main(command + ["--methods", "ap,atp", "--rules", rules, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert f"--rules {rules}: calibrated rules are used by RelP, which --methods ap,atp does not run; " \
           "add relp to --methods" in err
