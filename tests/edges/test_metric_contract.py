"""Edges, exact edges and faithfulness curves evaluate the metric through the one contract:
one finite value per prompt, or a ValueError that names the metric (never scores scaled by
1/B, NaN curves or an opaque RuntimeError); token ids outside the vocabulary are named."""
import pytest
import torch

from captum_relp.edges import build_graph, edge_scores, exact_edge_scores, faithfulness_curve
from captum_relp.metrics import LogitDiff
from tests.conftest import build_model
from tests.edges.test_graph import _inputs


def batch_mean(logits):
    return (logits[:, -1, 3] - logits[:, -1, 4]).mean()


def per_position(logits):
    return logits[:, :, 3] - logits[:, :, 4]


def not_a_number(logits):
    return logits[:, -1, 3] * float("nan")


BAD = [(batch_mean, r"batch_mean returned shape \(\) for 3 rows"),
       (per_position, r"per_position returned shape \(3, 6\) for 3 rows"),
       (not_a_number, r"not_a_number contain 3 non-finite")]
RUNS = {
    "relp": lambda m, g, c, k, metric, mask: edge_scores(m, g, c, k, metric, mask, method="relp"),
    "eap": lambda m, g, c, k, metric, mask: edge_scores(m, g, c, k, metric, mask, method="eap"),
    "eap-ig": lambda m, g, c, k, metric, mask: edge_scores(m, g, c, k, metric, mask, method="eap-ig", n_steps=2),
    "exact": lambda m, g, c, k, metric, mask: exact_edge_scores(m, g, c, k, metric, mask),
    "faithfulness": lambda m, g, c, k, metric, mask: faithfulness_curve(
        m, g, torch.rand(g.edge_mask.shape), c, k, metric, mask, fractions=(0.0, 0.5, 1.0)),
}


@pytest.fixture(scope="module")
def setup():
    model = build_model("gpt2")
    return model, build_graph(model), _inputs()


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("metric,message", BAD, ids=[m.__name__ for m, _ in BAD])
def test_bad_metric_is_named(setup, run, metric, message):
    model, graph, (clean, corrupt, mask) = setup
    with pytest.raises(ValueError, match=message):
        RUNS[run](model, graph, clean, corrupt, metric, mask)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_good_metric_still_runs_and_token_ids_are_checked(setup, run):
    model, graph, (clean, corrupt, mask) = setup
    metric = LogitDiff([3, 5, 7], [4, 6, 8], positions=[5, 3, 5])
    result = RUNS[run](model, graph, clean, corrupt, metric, mask)
    values = result.scores if hasattr(result, "scores") else torch.tensor(result.faithfulness)
    assert torch.isfinite(values).all()
    bad = corrupt.clone()
    bad[0, 2], bad[1, 0] = 64, 70
    with pytest.raises(ValueError, match=r"token ids \[64, 70\] are outside the vocabulary of GPT2LMHeadModel "
                                         r"\(size 64\)"):
        RUNS[run](model, graph, clean, bad, metric, mask)


def test_exact_edges_call_the_metric_per_copy_of_the_batch(setup):
    """A metric written for B rows (not k * B tiled rows) works: the contract hands it B rows at a time."""
    model, graph, (clean, corrupt, mask) = setup
    ids = torch.tensor([3, 5, 7])

    def three_rows(logits):
        assert logits.shape[0] == 3
        return logits[torch.arange(3), -1, ids] - logits[:, -1, 4]

    exact = exact_edge_scores(model, graph, clean, corrupt, three_rows, mask).scores
    reference = exact_edge_scores(model, graph, clean, corrupt, LogitDiff(ids, 4), mask).scores
    assert torch.equal(exact, reference)
