"""Connected circuits (pruning, greedy selection) and ungrouped key/value inputs."""
import pytest
import torch

from captum_relp.edges import build_graph, graph_forward, greedy_circuit, prune_circuit
from captum_relp.edges.evaluate import top_edges
from tests.conftest import build_model
from tests.edges.test_graph import _inputs


def _logits(model, graph, keep, clean, mask, corrupt_outputs):
    patch = (graph.edge_mask & ~keep).double()
    return graph_forward(model, graph, clean, mask, patch=patch, corrupt_outputs=corrupt_outputs).logits


def _connected(graph, keep):
    """Every kept edge lies on a kept path input -> ... -> logits (checked by search, not by pruning)."""
    reached = {"input"}
    for u, v in sorted(keep.nonzero().tolist(), key=lambda e: e[1]):  # downstream order is topological
        if graph.upstream[u] in reached:
            reached.add(graph.node_of_input(v))
    feeds = {"logits"}
    for u, v in sorted(keep.nonzero().tolist(), key=lambda e: -e[1]):
        if graph.node_of_input(v) in feeds:
            feeds.add(graph.upstream[u])
    return all(graph.upstream[u] in reached and graph.node_of_input(v) in feeds for u, v in keep.nonzero().tolist())


@pytest.mark.parametrize("family,ungroup", [("gpt2", False), ("llama", True)])
def test_pruning_keeps_the_circuit_output_and_connects_it(family, ungroup):
    model = build_model(family).double()
    graph = build_graph(model, ungroup_kv=ungroup)
    clean, corrupt, mask = _inputs()
    with torch.no_grad():
        reference = graph_forward(model, graph, corrupt, mask).outputs
        removed = 0
        tol = 1e-6 if family == "llama" else 1e-10  # LlamaRMSNorm computes in float32 even for float64 inputs
        for seed in range(4):
            scores = torch.randn(graph.edge_mask.shape, generator=torch.Generator().manual_seed(seed))
            for k in (3, 10, 30):
                keep = top_edges(scores, graph, k)
                pruned = prune_circuit(keep, graph)
                assert not (pruned & ~keep).any()
                assert _connected(graph, pruned)
                removed += int(keep.sum() - pruned.sum())
                torch.testing.assert_close(_logits(model, graph, pruned, clean, mask, reference),
                                           _logits(model, graph, keep, clean, mask, reference),
                                           rtol=tol, atol=tol)
    assert removed > 0  # dangling edges existed and were removed


def test_top_k_circuits_are_not_always_connected():
    graph = build_graph(build_model("gpt2"))
    keep = torch.zeros(graph.edge_mask.shape, dtype=torch.bool)
    keep[graph.head_node(1, 2), graph.logits_slot] = True
    assert not _connected(graph, keep) and not prune_circuit(keep, graph).any()


def test_greedy_circuits_reach_the_logits_and_follow_scores():
    graph = build_graph(build_model("gpt2"))
    scores = torch.zeros(graph.edge_mask.shape)
    head = graph.head_node(0, 1)
    scores[0, graph.mlp_slot(1)] = 10.0  # best edge overall, but m1 does not reach the logits in the circuit
    scores[head, graph.logits_slot] = 3.0
    scores[0, graph.downstream.index("a0.h1<v>")] = 2.0
    scores[0, graph.logits_slot] = 1.0
    greedy = greedy_circuit(scores, graph, 3)
    names = sorted(graph.edge_name(u, v) for u, v in greedy.nonzero().tolist())
    assert names == ["a0.h1->logits", "input->a0.h1<v>", "input->logits"]
    assert _connected(graph, greedy)
    assert top_edges(scores, graph, 3)[0, graph.mlp_slot(1)]  # global top-k takes the disconnected edge
    for seed in range(3):
        scores = torch.randn(graph.edge_mask.shape, generator=torch.Generator().manual_seed(seed))
        for k in (5, 40):
            circuit = greedy_circuit(scores, graph, k, absolute=False)
            assert int(circuit.sum()) <= k and _connected(graph, circuit)


def test_ungrouped_key_value_inputs():
    model = build_model("llama").double()  # 4 query heads, 2 key/value heads
    grouped, ungrouped = build_graph(model), build_graph(model, ungroup_kv=True)
    assert (grouped.n_kv_inputs, ungrouped.n_kv_inputs) == (2, 4)
    # two more key and two more value inputs per layer, read from 1 upstream node (layer 0) or 6 (layer 1)
    assert ungrouped.n_edges - grouped.n_edges == 4 * 1 + 4 * 6
    clean, corrupt, mask = _inputs()
    with torch.no_grad():
        for graph in (grouped, ungrouped):
            torch.testing.assert_close(graph_forward(model, graph, clean, mask).logits,
                                       model(clean, attention_mask=mask).logits, rtol=1e-10, atol=1e-10)
        ref_g = graph_forward(model, grouped, corrupt, mask).outputs
        ref_u = graph_forward(model, ungrouped, corrupt, mask).outputs

        def patched(graph, reference, names):
            patch = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
            for name in names:
                patch[0, graph.downstream.index(name)] = 1.0
            return graph_forward(model, graph, clean, mask, patch=patch, corrupt_outputs=reference).logits

        # the group-1 key input read by heads 2 and 3 = the key inputs of heads 2 and 3 together
        torch.testing.assert_close(patched(grouped, ref_g, ["a1.h1<k>"]),
                                   patched(ungrouped, ref_u, ["a1.h2<k>", "a1.h3<k>"]), rtol=1e-10, atol=1e-10)
        one_head = patched(ungrouped, ref_u, ["a1.h2<k>"])
        assert (one_head - patched(ungrouped, ref_u, ["a1.h2<k>", "a1.h3<k>"])).abs().max() > 1e-6


def _partly_scored(graph, unscored):
    """Random scores with ``nan`` (not scored) on the edges ``unscored`` of ``graph.edges()``."""
    scores = torch.rand(graph.edge_mask.shape, generator=torch.Generator().manual_seed(0))
    for u, v in [graph.edges()[i] for i in unscored]:
        scores[u, v] = float("nan")
    return scores


def test_top_edges_choose_only_scored_edges():
    graph = build_graph(build_model("gpt2"))
    scores = _partly_scored(graph, [0, 5, 7])
    for absolute in (True, False):
        keep = top_edges(scores, graph, 4, absolute)
        assert int(keep.sum()) == 4 and not scores[keep].isnan().any()
        finite = scores.masked_fill(~graph.edge_mask | scores.isnan(), -1.0)
        assert torch.equal(scores[keep].sort().values, finite.flatten().topk(4).values.sort().values)
    with pytest.raises(ValueError, match=f"3 of the {graph.n_edges} edges are unscored"):
        top_edges(scores, graph, graph.n_edges - 2)


def test_greedy_circuit_chooses_only_scored_edges():
    graph = build_graph(build_model("gpt2"))
    unscored = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))[:graph.n_edges // 3]
    scores = _partly_scored(graph, unscored.tolist())
    for absolute in (True, False):
        keep = greedy_circuit(scores, graph, 10, absolute)
        assert keep.any() and not scores[keep].isnan().any()
    with pytest.raises(ValueError, match=f"{len(unscored)} of the {graph.n_edges} edges are unscored"):
        greedy_circuit(scores, graph, graph.n_edges - len(unscored) + 1)
