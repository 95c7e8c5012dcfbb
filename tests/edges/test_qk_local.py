"""``relp-ah-qk``: RelP-AH with the local attention-pattern gradient at the query/key inputs, one pass.

Checks: the forward is unchanged; every non-q/k edge scores as ``relp-ah``; last-layer q/k edges
score as the two-pass ``relp-ah+qk`` (no later pattern path); without rules on a 1-layer model it
is EAP (checked against finite differences of exact edge patching); earlier layers' q/k
coefficients are the softmax gradient of that head alone, driven by the AH coefficient of its
output, recomputed here with torch.autograd.
"""
import pytest
import torch

from captum_relp.edges import build_graph, edge_scores, graph_forward
from captum_relp.edges.scores import _coefficients, qk_columns
from captum_relp.metrics import LogitDiff
from captum_relp.rules import resolve_rules
from tests.conftest import build_model
from tests.edges.test_graph import _inputs
from tests.oracles import relp_reference as reference

METRIC = LogitDiff([3, 5, 7], [4, 6, 8], positions=[5, 3, 5])


def _setup(family, n_layers=2):
    model = build_model(family, n_layers=n_layers).double()
    return model, build_graph(model), _inputs()


def _layer_columns(graph, layer):
    columns = torch.zeros(len(graph.downstream), dtype=torch.bool)
    columns[graph.attn_slots(layer)] = True
    return columns & qk_columns(graph)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_unchanged(family):
    model, graph, (clean, _, mask) = _setup(family)
    with torch.no_grad():
        plain = graph_forward(model, graph, clean, mask)
        local = graph_forward(model, graph, clean, mask, ah="qk-local")
    assert torch.equal(plain.logits, local.logits)
    assert torch.equal(plain.outputs, local.outputs)
    with pytest.raises(ValueError, match="qk-local"):
        graph_forward(model, graph, clean, mask, ah="qk")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_one_pass_matches_relp_ah_off_qk_and_two_pass_in_last_layer(family):
    model, graph, (clean, corrupt, mask) = _setup(family, n_layers=3)
    args = (model, graph, clean, corrupt, METRIC, mask)
    one = edge_scores(*args, method="relp-ah-qk")
    ah = edge_scores(*args, method="relp-ah").scores
    two = edge_scores(*args, method="relp-ah+qk")
    qk = qk_columns(graph)
    assert (one.n_forward, one.n_backward, two.n_forward, two.n_backward) == (2, 1, 3, 2)
    assert torch.equal(one.scores[:, ~qk], ah[:, ~qk])
    assert torch.equal(two.scores[:, ~qk], ah[:, ~qk])
    assert (ah[:, qk] == 0).all() and one.scores[:, qk].abs().max() > 0
    last = _layer_columns(graph, graph.n_layers - 1)
    torch.testing.assert_close(one.scores[:, last], two.scores[:, last], rtol=1e-10, atol=1e-14)
    # earlier layers: later patterns change the upstream coefficient, so the two definitions differ
    early = qk & ~last
    assert not torch.allclose(one.scores[:, early], two.scores[:, early], rtol=1e-6, atol=0)


def test_one_layer_without_rules_is_eap_and_exact_derivative():
    model, graph, (clean, corrupt, mask) = _setup("gpt2", n_layers=1)
    args = (model, graph, clean, corrupt, METRIC, mask)
    local = edge_scores(*args, method="relp-ah-qk", rules="none").scores
    eap = edge_scores(*args, method="eap").scores
    torch.testing.assert_close(local, eap, rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # q/k edge scores = -d metric / d t of patching the edge by t (central difference)
        reference = graph_forward(model, graph, corrupt, mask).outputs
        for u, v in [(0, 0), (0, 3), (0, 5), (0, 7)]:  # one layer: only the embeddings feed q and k
            assert graph.downstream[v].endswith(("<q>", "<k>")) and graph.edge_mask[u, v]
            values = []
            for t in (1e-5, -1e-5):
                patch = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
                patch[u, v] = t
                run = graph_forward(model, graph, clean, mask, patch=patch, corrupt_outputs=reference)
                values.append(METRIC(run.logits).mean())
            assert local[u, v].item() == pytest.approx(-(values[0] - values[1]).item() / 2e-5, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_early_qk_coefficient_is_the_local_pattern_gradient(family):
    """Layer 0's q/k coefficients = d/dx_qk of <G, heads_0(x)>, G = the AH coefficient of layer 0's heads
    (the sum of the non-q/k input coefficients each head output feeds), the heads recomputed here."""
    model, graph, (clean, corrupt, mask) = _setup(family)
    ruleset = resolve_rules("relp-ah")
    _, coefficients = _coefficients(model, graph, clean, METRIC, mask, ruleset, qk_local=True)
    qk = qk_columns(graph)
    heads = [graph.head_node(0, h) for h in range(graph.n_heads)]
    downstream = graph.edge_mask[heads].double() * (~qk).double()  # (H, V)
    g = torch.einsum("hv,btvd->bthd", downstream, coefficients)  # AH coefficient of each head's output
    with torch.no_grad():
        x0 = graph_forward(model, graph, clean, mask).inputs[0]  # layer 0's q/k/v inputs (B, T, S, d)
    x0 = x0.clone().requires_grad_(True)
    out = _heads_by_hand(model, graph, x0, mask)
    expected = torch.autograd.grad((out * g).sum(), x0)[0]
    slots = _layer_columns(graph, 0)
    torch.testing.assert_close(coefficients[:, :, slots], expected[:, :, slots[graph.attn_slots(0)]],
                               rtol=1e-9, atol=1e-13)


def _heads_by_hand(model, graph, x, mask):
    """Layer 0's per-head outputs ``(B, T, H, d)`` from its per-slot inputs ``x`` ``(B, T, H + 2K, d)``
    (query inputs, then K key and K value inputs), in plain torch from the weights: the LN-rule on
    the norm, plain softmax attention."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    B, T, _, d = x.shape
    H, K = graph.n_heads, graph.n_kv_inputs
    D = d // H
    rules = {"ln"}
    if cfg.model_type == "gpt2":
        p = "transformer.h.0."
        normed = reference.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.layer_norm_epsilon, rules)
        w_qkv, b_qkv = w[p + "attn.c_attn.weight"].split(d, dim=1), w[p + "attn.c_attn.bias"].split(d)
        w_o, b_o = w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"]  # Conv1D: (in, out)
    else:
        p = "model.layers.0."
        normed = reference.llama_rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps, rules)
        w_qkv = [w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv"]
        b_qkv = [torch.zeros(m.shape[1], dtype=x.dtype) for m in w_qkv]
        w_o, b_o = w[p + "self_attn.o_proj.weight"].T, None

    def project(first, count, index):  # slot first + j through head j's columns of projection ``index``
        return torch.stack([normed[:, :, first + j] @ w_qkv[index][:, j * D:(j + 1) * D]
                            + b_qkv[index][j * D:(j + 1) * D] for j in range(count)], dim=1)  # (B, heads, T, D)

    q, k, v = project(0, H, 0), project(H, K, 1), project(H + K, K, 2)
    if cfg.model_type != "gpt2":
        cos, sin = reference.rope_tables(cfg, T, x.dtype, D)
        q, k = reference.rope(q, cos, sin), reference.rope(k, cos, sin)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    z = reference.attend(q, k, v, mask, D ** -0.5, rules).reshape(B, T, H, D)
    out = torch.einsum("bthe,hed->bthd", z, w_o.reshape(H, D, d))
    return out if b_o is None else out + b_o / H


def test_cli_scores_both_qk_methods(tmp_path):
    from captum_relp.cli import main

    code = main(["edges", "--model", "tiny-gpt2-ioi", "--method", "relp-ah-qk,relp-ah+qk", "--no-exact",
                 "--n-prompts", "3", "--repeats", "1", "--fractions", "0,0.1,1", "--no-plots", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    import json

    data = json.loads((tmp_path / "edges_results.json").read_text())
    assert (data["relp-ah-qk"]["n_forward"], data["relp-ah-qk"]["n_backward"]) == (2, 1)
    assert (data["relp-ah+qk"]["n_forward"], data["relp-ah+qk"]["n_backward"]) == (3, 2)
    names, one, two = data["meta"]["edges"], data["relp-ah-qk"]["scores"], data["relp-ah+qk"]["scores"]
    last = [i for i, name in enumerate(names) if name.endswith(("a3.h0<q>", "a3.h1<k>"))]
    assert last and all(one[i] == pytest.approx(two[i], rel=1e-5, abs=1e-7) for i in last)
