"""``captum-relp edges`` end to end on the shipped tiny model."""
import json

import pytest

from captum_relp.cli import main


def test_edges_cli_end_to_end(tmp_path, capsys):
    code = main(["edges", "--model", "tiny-gpt2-ioi", "--task", "ioi", "--method", "relp,eap,eap-ig",
                 "--n-prompts", "3", "--n-steps", "2", "--repeats", "1", "--fractions", "0,0.1,0.5,1",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "edges_results.json").read_text())
    assert set(data) == {"relp", "eap", "eap-ig", "exact", "meta"}
    assert data["meta"]["n_edges"] == 479  # 4 layers x 4 heads, GPT-2 (sequential residual)
    assert data["meta"]["convention"]["name"] == "library" and data["meta"]["convention"]["ig_grid"] == "right"
    assert not data["meta"]["convention"]["cpr_signed"]
    for method in ("relp", "eap", "eap-ig", "exact"):
        entry = data[method]
        curve = entry["curve"]
        assert curve["fractions"] == [0.0, 0.1, 0.5, 1.0]
        assert curve["n_edges"] == [0, 48, 240, 479]
        # the empty circuit is the corrupt run, the full circuit the clean run
        assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-9)
        assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-9)
        f = curve["faithfulness"]
        assert entry["cpr"] == pytest.approx(0.05 * (f[0] + f[1]) + 0.2 * (f[1] + f[2]) + 0.25 * (f[2] + f[3]))
        assert entry["cmd"] == pytest.approx(0.05 * (1 + abs(1 - f[1])) + 0.2 * (abs(1 - f[1]) + abs(1 - f[2]))
                                             + 0.25 * abs(1 - f[2]))
        assert entry["seconds"] > 0 and len(entry["top_edges"]) == 20 and len(entry["scores"]) == 479
        assert curve["m_full"] > curve["m_empty"]  # the model solves IOI on these prompts
        if method != "exact":
            assert set(entry["pcc_vs_exact_by_input"]) == {"q", "k", "v", "mlp", "logits"}
    top_name, top_value = data["exact"]["top_edges"][0]
    assert data["exact"]["scores"][data["meta"]["edges"].index(top_name)] == top_value
    assert (data["relp"]["n_forward"], data["relp"]["n_backward"]) == (2, 1)
    assert (data["eap"]["n_forward"], data["eap"]["n_backward"]) == (2, 1)
    assert (data["eap-ig"]["n_forward"], data["eap-ig"]["n_backward"]) == (3, 2)
    assert data["eap"]["time_vs_eap"] == 1.0
    assert data["exact"]["pcc_vs_exact"] is None
    for method in ("relp", "eap", "eap-ig"):
        assert 0.5 < data[method]["pcc_vs_exact"] <= 1.0
    assert data["exact"]["n_forward"] == 2 + -(-479 // (512 // 3))
    for name in ("edges_faithfulness.png", "edges_circuit_relp.png", "edges_circuit_exact.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "CPR" in capsys.readouterr().out


def test_edges_cli_bad_method(capsys):
    assert main(["edges", "--method", "relp,magic", "--quiet"]) == 2
    assert "--method" in capsys.readouterr().err
