"""Edge scores with calibrated rules, and ``--rules calibrated`` in ``captum-relp edges`` / ``circuit``."""
import json
import warnings

import pytest
import torch
from tests.conftest import build_model, token_pair

from captum_relp import CalibratedRules, RuleSet
from captum_relp.calibration import explicit_ruleset
from captum_relp.cli import main
from captum_relp.edges import build_graph, edge_scores
from captum_relp.edges.scores import upstream_kinds


def test_edges_out_of_each_node_use_its_kinds_rules():
    model = build_model("llama")
    graph = build_graph(model)
    clean, corrupt = token_pair(batch=2, seq=5)
    met = lambda out: out[:, -1, 1] - out[:, -1, 2]  # noqa: E731
    candidates = {"relp": RuleSet("relp"), "gradient": RuleSet("gradient", categories=()),
                  "ln": RuleSet("ln", categories=("norm",))}
    choices = {"resid": "relp", "attn": "gradient", "mlp": "ln"}
    cal = CalibratedRules(candidates, choices, {}, ["resid", "attn", "mlp"])
    together = edge_scores(model, graph, clean, corrupt, met, rules=cal)
    assert together.n_backward == 3 and together.n_forward == 4  # corrupt + one pass per distinct set
    kinds = upstream_kinds(graph)
    assert kinds[0] == "resid" and kinds.count("mlp") == 2 and kinds.count("attn") == 8
    for kind, name in choices.items():
        alone = edge_scores(model, graph, clean, corrupt, met, rules=explicit_ruleset(candidates[name]))
        rows = [u for u, k in enumerate(kinds) if k == kind]
        assert torch.equal(together.scores[rows], alone.scores[rows])
    with pytest.raises(ValueError, match="was not calibrated"):
        edge_scores(model, graph, clean, corrupt, met, rules=CalibratedRules(candidates, {"attn": "relp"}, {},
                                                                             ["attn"]))


def test_edges_cli_rules_calibrated(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["edges", "--model", "tiny-gpt2-ioi", "--method", "relp", "--no-exact", "--rules", "calibrated",
                     "--n-prompts", "3", "--calibration-prompts", "4", "--repeats", "1", "--device", "cpu",
                     "--quiet", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "edges_results.json").read_text())
    assert {"relp", "eap", "calibrated"} <= set(data)
    assert data["calibrated"]["n_backward"] == len(set(data["meta"]["calibration"]["choices"].values()))


def test_circuit_cli_rules_calibrated(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["circuit", "--task", "ioi", "--nodes", "components", "--method", "relp", "--rules",
                     "calibrated", "--calibration-prompts", "4", "--n-train", "4", "--n-test", "4", "--device",
                     "cpu", "--quiet", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "circuit_results.json").read_text())
    assert set(data["config"]["calibration"]["template_1"]["choices"]) == {"resid", "attn", "mlp"}
    assert "calibrated rules for RelP" in capsys.readouterr().out
