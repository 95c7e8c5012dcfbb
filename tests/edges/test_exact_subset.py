"""``exact_edge_scores(edges=...)``: a subset of edges scores exactly as the full run does,
costs only its own patched runs, marks the other edges as unscored (nan), and is refused
by PCC and circuit helpers where it would read as zero effects."""
import pytest
import torch

from captum_relp.edges import build_graph, exact_edge_scores, faithfulness_curve, pearson
from captum_relp.edges.graph import edge_subset
from captum_relp.integrations.distributed import DataParallelSweep
from tests.conftest import build_model
from tests.edges.test_graph import _inputs
from tests.edges.test_scores import METRIC


def _setup(family):
    model = build_model(family).double()
    return model, build_graph(model), _inputs()


@pytest.fixture(scope="module", params=["gpt2", "llama"])  # llama: grouped key/value heads
def full(request):
    model, graph, (clean, corrupt, mask) = _setup(request.param)
    # max_rows=3: one edge per patched forward (3 prompts), the same rows as any subset run with it
    return model, graph, (clean, corrupt, mask), exact_edge_scores(model, graph, clean, corrupt, METRIC, mask,
                                                                   max_rows=3)


def _positions(graph):
    return torch.tensor([0, 3, 4, 11, graph.n_edges // 2, graph.n_edges - 1, 11])  # a duplicate, both ends


@pytest.mark.parametrize("as_mask", [False, True])
def test_subset_equals_the_full_run_and_costs_only_its_groups(full, as_mask):
    model, graph, (clean, corrupt, mask), reference = full
    positions = _positions(graph)
    chosen = torch.zeros(graph.n_edges, dtype=torch.bool)
    chosen[positions] = True
    subset = torch.zeros_like(graph.edge_mask)
    subset[graph.edge_mask] = chosen
    edges = subset if as_mask else positions
    result = exact_edge_scores(model, graph, clean, corrupt, METRIC, mask, max_rows=3, edges=edges)
    assert torch.equal(result.scored, subset)
    assert torch.equal(result.scores[subset], reference.scores[subset])
    assert result.scores[subset].abs().min() > 0  # real effects, not placeholders
    assert result.scores[graph.edge_mask & ~subset].isnan().all()  # unscored edges are not zero effects
    assert (result.scores[~graph.edge_mask] == 0).all()
    assert result.n_forward == 2 + 6  # 6 distinct edges, one per patched forward
    vector, scored = result.edge_vector(graph), result.scored_vector(graph)
    assert torch.equal(scored, chosen)
    assert torch.equal(vector[scored], reference.edge_vector(graph)[chosen])
    assert reference.scored is None and reference.scored_vector(graph).all()
    grouped = exact_edge_scores(model, graph, clean, corrupt, METRIC, mask, max_rows=6, edges=edges)
    assert grouped.n_forward == 2 + 3  # two edges per patched forward
    # Llama's rotary cos/sin are computed in float32 inside transformers, batched per forward: stacking
    # other copies moves them by float32 rounding (~1e-8 here); GPT-2 stays float64 throughout.
    tolerance = dict(rtol=1e-5, atol=1e-9) if graph.family == "llama" else dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(grouped.scores[subset], reference.scores[subset], **tolerance)

def test_pcc_and_circuits_refuse_unscored_edges(full):
    model, graph, (clean, corrupt, mask), reference = full
    result = exact_edge_scores(model, graph, clean, corrupt, METRIC, mask, edges=_positions(graph))
    with pytest.raises(ValueError, match="nan"):
        pearson(result.edge_vector(graph), reference.edge_vector(graph))
    scored = result.scored_vector(graph)
    assert pearson(result.edge_vector(graph)[scored], reference.edge_vector(graph)[scored]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nan"):
        faithfulness_curve(model, graph, result.scores, clean, corrupt, METRIC, mask)


class _TwoRanks(DataParallelSweep):
    """Rank 1 runs first and leaves its groups here; rank 0 then gathers both (torchrun's order)."""

    parts: dict = {}

    def gather(self, mine, n_items):
        self.parts[self.rank] = list(mine)
        if len(self.parts) < 2:
            return [torch.full((64,), float("nan"), dtype=torch.float64)] * n_items
        out = [None] * n_items
        for rank, part in self.parts.items():
            for offset, value in enumerate(part):
                out[rank + offset * self.world_size] = value
        return out


def test_subset_is_sharded_like_the_full_run(full):
    model, graph, (clean, corrupt, mask), reference = full
    positions = torch.arange(0, graph.n_edges, 5)
    args = (model, graph, clean, corrupt, METRIC, mask)
    single = exact_edge_scores(*args, max_rows=9, edges=positions)
    _TwoRanks.parts = {}
    exact_edge_scores(*args, max_rows=9, edges=positions, sweep=_TwoRanks(1, 2))
    gathered = exact_edge_scores(*args, max_rows=9, edges=positions, sweep=_TwoRanks(0, 2))
    assert len(_TwoRanks.parts[0]) + len(_TwoRanks.parts[1]) == -(-len(positions) // 3) > 2
    torch.testing.assert_close(gathered.scores, single.scores, rtol=0, atol=0, equal_nan=True)
    assert gathered.n_forward == single.n_forward


def test_bad_edges_name_the_argument():
    model, graph, _ = _setup("llama")
    n_up, n_down = graph.edge_mask.shape
    outside = ~graph.edge_mask
    cases = [
        (torch.ones(n_up, n_down + 1, dtype=torch.bool), "graph's shape"),
        (outside, r"not edges of the graph, e\.g\. " + graph.edge_name(*outside.nonzero()[0].tolist())),
        (torch.tensor([0, graph.n_edges]), f"position {graph.n_edges} is not an edge"),
        (torch.tensor([-1]), "position -1 is not an edge"),
        (torch.tensor([[0, 1]]), "1-D"),
        (torch.tensor([0.0, 1.0]), "dtype"),
        (torch.zeros_like(graph.edge_mask), "selects no edge"),
        ([0, 1], "must be a Tensor"),
    ]
    for edges, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            edge_subset(graph, edges)
        assert "edges" in str(error.value)
    clean, corrupt, mask = _inputs()
    with pytest.raises(ValueError, match="edges: position"):
        exact_edge_scores(model, graph, clean, corrupt, METRIC, mask, edges=torch.tensor([graph.n_edges]))
