"""Feature edges: chain-rule identity, finite differences, AtP = rules "none", the circuit experiment's JSON."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from captum_relp.circuits.effects import node_effects
from captum_relp.circuits.feature_edges import METRIC_NODE, feature_edges
from captum_relp.circuits.nodes import NodeSpace
from captum_relp.circuits.sae import SparseAutoencoder
from captum_relp.cli import main
from captum_relp.metrics import logit_diff
from tests.oracles.relp_reference import relp_scores


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8)).eval().double()
    saes = {}
    for layer in range(2):
        for kind in ("resid", "attn", "mlp"):
            sae = SparseAutoencoder(16, 6, dtype=torch.float64)
            with torch.no_grad():
                for param in sae.parameters():
                    param.normal_(0, 0.3)
            saes[f"{kind}_{layer}"] = sae
    clean, corrupt = torch.randint(20, (3, 4)), torch.randint(20, (3, 4))
    return model, saes, clean, corrupt, logit_diff(1, 2)


@pytest.mark.parametrize("kind", ["components", "features"])
@pytest.mark.parametrize("rules,method", [("none", "AtP"), ("relp", "RelP")])
def test_outgoing_edges_sum_to_node_effect(tiny, kind, rules, method):
    """Each node's effect and the sum of its outgoing edges equal an independent computation: for
    components the plain-torch RelP of tests/oracles; for SAE features, node_effects. Edges and
    effects are float32 (feature_edges casts them), hence the tolerance."""
    model, saes, clean, corrupt, metric = tiny
    space = NodeSpace(model, kind, saes if kind == "features" else None)
    result = feature_edges(space, clean, corrupt, metric, rules=rules, n_nodes=None)
    if kind == "components":
        mask = torch.ones_like(clean)
        scores, _ = relp_scores(model, clean, corrupt, mask, [1] * len(clean), [2] * len(clean), rules)
        effects = {f"{name}_{layer}": score.sum(-1, keepdim=True) for (name, layer), score in scores.items()}
    else:
        effects = node_effects(space, method, clean, corrupt, metric).effects
    assert result.n_forward == 3 and result.n_backward > 2
    assert len(result.nodes) == sum(e.shape[1] * e.shape[2] for k, e in effects.items()
                                    if kind != "components" or k[:4] in ("attn", "mlp_"))
    scale = max(abs(node["effect"]) for node in result.nodes)
    assert scale > 1e-3
    for node in result.nodes:
        reference = effects[node["group"]].mean(0)[node["position"], node["unit"]].item()
        assert node["effect"] == pytest.approx(reference, abs=1e-6 * scale)
        assert result.outgoing(node["id"]) == pytest.approx(reference, abs=1e-6 * scale)


def test_atp_edge_equals_finite_difference(tiny):
    """attn_0 (position 1) -> mlp_1 (position 3), other groups frozen: rho_d . (d(eps) - d(0)) / eps."""
    model, _, clean, corrupt, metric = tiny
    space = NodeSpace(model, "components")
    result = feature_edges(space, clean, corrupt, metric, rules="none", n_nodes=None)
    edge = next(e for e in result.edges if e["source"] == "attn_0/1/0" and e["target"] == "mlp_1/3/0")
    blocks = model.transformer.h
    cache = {}

    def keep(name, tuple_output=True):
        def hook(module, args, output):
            cache.setdefault(name, (output[0] if tuple_output else output).detach())

        return hook

    grab = [blocks[0].attn.register_forward_hook(keep("attn_c")),
            blocks[0].mlp.register_forward_hook(keep("mlp0", False)),
            blocks[1].attn.register_forward_hook(keep("attn1"))]
    with torch.no_grad():
        model(clean)
    for h in grab:
        h.remove()
    with torch.no_grad():
        hook = blocks[0].attn.register_forward_hook(keep("attn_k"))
        model(corrupt)
        hook.remove()
    delta = torch.zeros_like(cache["attn_c"])
    delta[:, 1] = cache["attn_c"][:, 1] - cache["attn_k"][:, 1]

    def mlp1(eps, track=False):
        out = {}
        hooks = [blocks[0].attn.register_forward_hook(lambda m, a, o: (cache["attn_c"] + eps * delta, *o[1:])),
                 blocks[0].mlp.register_forward_hook(lambda m, a, o: cache["mlp0"]),
                 blocks[1].attn.register_forward_hook(lambda m, a, o: (cache["attn1"], *o[1:]))]
        hooks.append(blocks[1].mlp.register_forward_hook(
            lambda m, a, o: out.setdefault("v", o.detach().requires_grad_(track))))
        try:
            logits = model(clean).logits
        finally:
            for h in hooks:
                h.remove()
        if track:
            return out["v"], torch.autograd.grad(metric(logits).sum(), out["v"])[0]
        return out["v"]

    base, rho = mlp1(0.0, track=True)
    eps = 1e-6
    brute = ((mlp1(eps) - base)[:, 3] * rho[:, 3]).sum(-1).mean() / eps
    assert edge["score"] == pytest.approx(brute.item(), rel=1e-4, abs=1e-9)


def test_top_nodes_and_json(tiny, tmp_path):
    model, saes, clean, corrupt, metric = tiny
    space = NodeSpace(model, "features", saes)
    result = feature_edges(space, clean, corrupt, metric, rules="relp", n_nodes=10)
    ids = {n["id"] for n in result.nodes}
    assert len(ids) == 10
    assert all(e["source"] in ids and (e["target"] in ids or e["target"] == METRIC_NODE) for e in result.edges)
    assert result.n_backward <= 2 + 10
    payload = json.loads(result.save(tmp_path / "edges.json").read_text())
    assert payload["rules"] == "relp" and len(payload["edges"]) == len(result.edges)
    assert abs(result.top_edges(1)[0]["score"]) == max(abs(e["score"]) for e in result.edges)


def test_circuit_cli_writes_edges(tmp_path):
    code = main(["circuit", "--task", "sva", "--nodes", "components", "--method", "relp,atp,ig", "--edges",
                 "--edge-nodes", "6", "--n-train", "4", "--n-test", "4", "--out", str(tmp_path), "--quiet",
                 "--no-plots", "--device", "cpu"])
    assert code == 0
    payload = json.loads((tmp_path / "circuit_edges.json").read_text())
    assert set(payload["circuits"]) == {"within_rc", "across_rc", "across_pp"}
    by_method = payload["circuits"]["across_pp"]
    assert set(by_method) == {"RelP", "AtP"}  # IG has no one-backward edge estimate
    assert by_method["RelP"]["rules"] == "relp" and by_method["AtP"]["rules"] == "none"
    assert len(by_method["RelP"]["nodes"]) == 6 and by_method["RelP"]["edges"]


def _batch_mean(logits):
    return (logits[:, -1, 1] - logits[:, -1, 2]).mean()


def _per_position(logits):
    return logits[:, :, 1] - logits[:, :, 2]


def _nan(logits):
    return logits[:, -1, 1] * float("nan")


@pytest.mark.parametrize("metric,message", [(_batch_mean, r"_batch_mean returned shape \(\) for 3 rows"),
                                            (_per_position, r"_per_position returned shape \(3, 4\) for 3 rows"),
                                            (_nan, r"_nan contain 3 non-finite")])
def test_metric_contract(tiny, metric, message):
    model, _, clean, corrupt, _ = tiny
    with pytest.raises(ValueError, match=message):
        feature_edges(NodeSpace(model, "components"), clean, corrupt, metric, n_nodes=4)


def test_bad_saes_and_token_ids_are_named(tiny):
    model, saes, clean, corrupt, metric = tiny
    broken = dict(saes)
    broken["mlp_1"] = SparseAutoencoder(16, 6, dtype=torch.float64)
    with torch.no_grad():
        broken["mlp_1"].W_dec[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"SAE 'mlp_1' has non-finite \(NaN or inf\) weights in \['W_dec'\]"):
        feature_edges(NodeSpace(model, "features", broken), clean, corrupt, metric)
    broken["mlp_1"] = SparseAutoencoder(12, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"SAE 'mlp_1' reads 12-wide activations, but hook point mlp_1 of "
                                         r"GPT2LMHeadModel is 16 wide"):
        NodeSpace(model, "features", broken)
    with pytest.raises(ValueError, match=r"token ids \[20\] are outside the vocabulary of GPT2LMHeadModel \(size 20\)"):
        feature_edges(NodeSpace(model, "components"), clean, torch.full_like(corrupt, 20), metric)


def test_unscored_edges_and_nodes_are_never_top():
    from captum_relp.circuits.feature_edges import FeatureEdges, _top_nodes

    nan = float("nan")
    found = FeatureEdges([], [{"source": "a", "target": METRIC_NODE, "score": nan},
                              {"source": "b", "target": METRIC_NODE, "score": -1.0},
                              {"source": "c", "target": METRIC_NODE, "score": 0.5}], "relp", 3, 2, 0.0)
    assert [e["source"] for e in found.top_edges(2)] == ["b", "c"]
    with pytest.raises(ValueError, match="1 of the 3 edges are unscored"):
        found.top_edges(3)
    effects = [torch.tensor([[nan, 1.0, -3.0]]), torch.tensor([[2.0, nan]])]
    assert _top_nodes(effects, 2) == [(0, 0, 2), (1, 0, 0)]
    with pytest.raises(ValueError, match="2 of the 5 nodes are unscored"):
        _top_nodes(effects, None)
