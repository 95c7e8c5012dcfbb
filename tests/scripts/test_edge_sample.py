"""scripts/_edge_sample.py (``make_edge_results.py --exact-sample``): the sampled exact scores are the
full exact run's entries, each PCC is the PCC on those edges, the top-edge union is the methods' top edges."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import _edge_sample  # noqa: E402

from captum_relp.edges import build_graph, exact_edge_scores, pearson  # noqa: E402
from captum_relp.embedded import load_model  # noqa: E402
from captum_relp.experiments.edges import make_batch  # noqa: E402

METHODS = ("relp", "relp-ah-qk", "eap", "eap-ig")


@pytest.fixture(scope="module")
def sampled():
    model, tokenizer = load_model("tiny-gpt2-ioi")
    model = model.double().eval()
    batch = make_batch(tokenizer, "ioi", 3, 0)
    graph = build_graph(model)
    scores = _edge_sample.method_scores(model, graph, batch, METHODS, "right", 2)
    out = _edge_sample.sampled_pcc(model, graph, batch, scores, 40, 3, 5, 200, 64)
    full = exact_edge_scores(model, graph, batch.clean_ids, batch.corrupt_ids, batch.metric(), batch.attention_mask)
    return graph, scores, out, full


def test_sample_is_the_full_exact_run_and_pcc_is_on_those_edges(sampled):
    graph, scores, out, full = sampled
    truth = full.edge_vector(graph)
    for name in ("uniform", "top_union"):
        block = out[name]
        positions = torch.tensor(block["positions"])
        torch.testing.assert_close(torch.tensor(block["exact"], dtype=torch.float64), truth[positions].double(),
                                   rtol=0, atol=1e-12)
        assert block["n_forward"] == 2 + -(-len(positions) // (64 // 3))
        for method in METHODS:
            expected = pearson(scores[method].edge_vector(graph)[positions], truth[positions])
            assert block["pcc"][method] == pytest.approx(expected, abs=1e-12)
            lo, hi = block["intervals"][method]
            assert -1 <= lo < hi <= 1
        assert "relp-ah-qk-minus-eap" in block["intervals"]
    assert out["uniform"]["n"] == 40 == len(set(out["uniform"]["positions"]))


def test_top_union_is_each_methods_top_edges(sampled):
    graph, scores, out, _ = sampled
    expected = set()
    for method in _edge_sample.TOP_METHODS:
        ranked = sorted(range(graph.n_edges), key=lambda i: -abs(scores[method].edge_vector(graph)[i].item()))
        expected |= set(ranked[:5])
    assert out["top_union"]["positions"] == sorted(expected)


def test_uniform_positions_are_seeded_and_checked():
    a = _edge_sample.uniform_positions(1000, 50, 0)
    assert torch.equal(a, _edge_sample.uniform_positions(1000, 50, 0)) and a.unique().numel() == 50
    assert not torch.equal(a, _edge_sample.uniform_positions(1000, 50, 1))
    with pytest.raises(ValueError, match="--exact-sample"):
        _edge_sample.uniform_positions(10, 11, 0)


def test_section_states_the_sample(sampled):
    _, _, out, _ = sampled
    text = "\n".join(_edge_sample.sample_section("library", out, METHODS))
    assert "It is a sample" in text and "40 edges drawn uniformly" in text and "seed 3" in text
    assert f"| relp-ah-qk | {out['uniform']['pcc']['relp-ah-qk']:.3f} [" in text
    assert "relp-ah-qk" in _edge_sample.sample_reading(out)


def test_the_script_compiles_without_warnings_and_keeps_the_escaped_bars():
    """``\\|`` in the page text is a Markdown-escaped bar, written as such (no invalid escape sequence)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an invalid escape sequence warns at compile time
        compile((ROOT / "scripts" / "_edge_sample.py").read_text(), "_edge_sample.py", "exec")
    sample = {"n_edges": 1000, "uniform": {"exact": [1e-4, -2e-4, 3e-2]}, "top_union": {"exact": [0.5, -2.0]}}
    text = _edge_sample._spread(sample)
    assert "(median \\|effect\\| 2.0e-04, largest 3.0e-02, against 2.0e+00 in the top-edge union)" in text
    assert text.startswith("The uniform sample holds 0.3% of the edges")
