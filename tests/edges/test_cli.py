"""``captum-relp edges`` end to end on the shipped tiny model."""
import json

import numpy as np
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
        assert data[method]["pcc_vs_exact"] > 0.5
    check_edge_pccs(data)
    with np.load(tmp_path / "edges_scores.npz") as saved:  # the documented scores file: same values, float64
        assert sorted(saved.files) == ["eap", "eap-ig", "edges", "exact", "relp"]
        assert saved["edges"].tolist() == data["meta"]["edges"]
        for method in ("relp", "eap", "eap-ig", "exact"):
            assert saved[method].dtype == np.float64 and saved[method].tolist() == data[method]["scores"]
        assert abs(data["relp"]["pcc_vs_exact"] - _pcc(saved["relp"], saved["exact"])) < 1e-12
    assert data["exact"]["n_forward"] == 2 + -(-479 // (512 // 3))
    for name in ("edges_faithfulness.png", "edges_circuit_relp.png", "edges_circuit_exact.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "CPR" in capsys.readouterr().out


def _pcc(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))


def _input_kind(edge: str) -> str:
    target = edge.split("->")[1]
    return target.split("<")[1].rstrip(">") if "<" in target else ("logits" if target == "logits" else "mlp")


def check_edge_pccs(data):
    """Every ``pcc_vs_exact`` and ``pcc_vs_exact_by_input`` of an edges JSON, recomputed from the
    saved per-edge scores to 1e-12 (``None`` where the scores of a kind are constant)."""
    exact = np.array(data["exact"]["scores"])
    kinds = np.array([_input_kind(edge) for edge in data["meta"]["edges"]])
    assert set(kinds) == {"q", "k", "v", "mlp", "logits"} and len(kinds) == len(exact)
    for method, entry in data.items():
        if method in ("meta", "exact"):
            continue
        scores = np.array(entry["scores"])
        assert abs(entry["pcc_vs_exact"] - _pcc(scores, exact)) < 1e-12, method
        for kind, value in entry["pcc_vs_exact_by_input"].items():
            rows = kinds == kind
            if scores[rows].std() == 0:
                assert value is None, (method, kind)
            else:
                assert abs(value - _pcc(scores[rows], exact[rows])) < 1e-12, (method, kind)


def test_edges_cli_bad_method(capsys):
    assert main(["edges", "--method", "relp,magic", "--quiet"]) == 2
    assert "--method" in capsys.readouterr().err
