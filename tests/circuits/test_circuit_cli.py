"""captum-relp circuit end to end on the embedded model (components; features from a --sae-dir)."""
import json

from captum_relp.circuits.sae import save_saelens
from captum_relp.cli import EXIT_USAGE, main
from captum_relp.embedded import load_embedded_saes


def test_circuit_components(tmp_path, capsys):
    code = main(["circuit", "--task", "sva", "--nodes", "components", "--method", "relp,atp",
                 "--n-train", "6", "--n-test", "6", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert code == 0
    assert "faithfulness / completeness" in capsys.readouterr().out
    payload = json.loads((tmp_path / "circuit_results.json").read_text())
    assert set(payload["curves"]) == {"within_rc", "across_rc", "across_pp"}
    assert payload["cost"]["RelP"]["forward_passes"] == 2 * 3 and payload["cost"]["RelP"]["backward_passes"] == 3
    assert (tmp_path / "circuit_faithfulness.png").exists()


def test_circuit_features_from_saelens_folder(tmp_path, capsys):
    sae_dir = tmp_path / "saes"
    for key, sae in load_embedded_saes("tiny-gpt2-ioi").items():
        save_saelens(sae, sae_dir / key)
    code = main(["circuit", "--task", "ioi", "--nodes", "features", "--method", "relp", "--sae-dir", str(sae_dir),
                 "--n-train", "4", "--n-test", "4", "--out", str(tmp_path / "out"), "--quiet", "--no-plots"])
    assert code == 0
    curve = json.loads((tmp_path / "out" / "circuit_results.json").read_text())["curves"]["template_1"]["RelP"]
    assert curve["n_nodes"][0] == 1 and len(curve["faithfulness"]) == len(curve["n_nodes"])


def test_circuit_bad_method(capsys):
    assert main(["circuit", "--method", "shap"]) == EXIT_USAGE
    assert "--method" in capsys.readouterr().err
