"""Edge scores: EAP = per-edge brute force, RelP(rules='none') = EAP, one backward pass,
RelP edge scores consistent with the library's RelP coefficients on the Hugging Face model."""
import pytest
import torch

from captum_relp.edges import build_graph, edge_scores, exact_edge_scores, graph_forward
from captum_relp.metrics import LogitDiff
from captum_relp.rules import apply_rules
from tests.conftest import build_model
from tests.edges.test_graph import _inputs, _mlp_norm

METRIC = LogitDiff([3, 5, 7], [4, 6, 8], positions=[5, 3, 5])


def _setup(family="gpt2"):
    model = build_model(family).double()
    return model, build_graph(model), _inputs()


def _patched_metric(model, graph, clean, mask, reference, u, v, t):
    patch = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
    patch[u, v] = t
    run = graph_forward(model, graph, clean, mask, patch=patch, corrupt_outputs=reference)
    return METRIC(run.logits).mean()


def test_eap_equals_brute_force_per_edge_gradient():
    model, graph, (clean, corrupt, mask) = _setup()
    eap = edge_scores(model, graph, clean, corrupt, METRIC, mask, method="eap").scores
    with torch.no_grad():
        reference = graph_forward(model, graph, corrupt, mask).outputs
        t = 1e-5
        for u, v in graph.edges():
            up = _patched_metric(model, graph, clean, mask, reference, u, v, t)
            down = _patched_metric(model, graph, clean, mask, reference, u, v, -t)
            # patching by t moves v's input by -t * (a_u - a_u'); score = -dm/dt
            assert eap[u, v].item() == pytest.approx(-(up - down).item() / (2 * t), rel=1e-5, abs=1e-9)
    assert (eap[~graph.edge_mask] == 0).all()


def test_relp_without_rules_is_eap_and_rules_change_scores():
    model, graph, (clean, corrupt, mask) = _setup("llama")
    eap = edge_scores(model, graph, clean, corrupt, METRIC, mask, method="eap").scores
    none = edge_scores(model, graph, clean, corrupt, METRIC, mask, method="relp", rules="none").scores
    relp = edge_scores(model, graph, clean, corrupt, METRIC, mask, method="relp").scores
    torch.testing.assert_close(none, eap, rtol=0, atol=0)
    assert not torch.allclose(relp, eap)


@pytest.mark.parametrize("method,forwards,backwards,grid", [("relp", 2, 1, "right"), ("relp-ah", 2, 1, "right"),
                                                            ("eap", 2, 1, "right"), ("eap-ig", 4, 3, "right"),
                                                            ("eap-ig", 5, 3, "left")])
def test_pass_counts(monkeypatch, method, forwards, backwards, grid):
    model, graph, (clean, corrupt, mask) = _setup()
    calls = {"forward": 0, "backward": 0, "model_grads": 0}
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        # rules call autograd.grad once on a 1-element tensor when applied (slope at 0): not a model pass
        inputs = [inputs] if torch.is_tensor(inputs) else inputs
        calls["model_grads"] += any(x.numel() > 1 for x in inputs)
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    count = lambda key: lambda *a: calls.__setitem__(key, calls[key] + 1)  # noqa: E731
    handle = model.transformer.ln_f.register_forward_hook(count("forward"))
    handle_back = model.lm_head.register_full_backward_hook(count("backward"))
    result = edge_scores(model, graph, clean, corrupt, METRIC, mask, method=method, n_steps=3, ig_grid=grid)
    handle.remove()
    handle_back.remove()
    assert calls == {"forward": forwards, "backward": backwards, "model_grads": backwards}
    assert (result.n_forward, result.n_backward) == (forwards, backwards)


def _library_node_scores(model, family, clean, corrupt, mask, rules):
    """sum over (positions, d) of (x_clean - x_corrupt) * rho at each attention/MLP norm's input and the final
    norm's input, rho from the model's own forward under apply_rules (grad of a clone read only there)."""
    norms = []
    for layer in range(2):
        block = model.transformer.h[layer] if family == "gpt2" else model.model.layers[layer]
        norms += [block.ln_1 if family == "gpt2" else block.input_layernorm, _mlp_norm(model, family, layer)]
    norms.append(model.transformer.ln_f if family == "gpt2" else model.model.norm)

    def run(ids, grad):
        store = []
        hooks = [n.register_forward_pre_hook(lambda m, args: (store.append(args[0].clone()) or store[-1],))
                 for n in norms]
        try:
            with torch.set_grad_enabled(grad):
                values = METRIC(model(ids, attention_mask=mask).logits)
        finally:
            for h in hooks:
                h.remove()
        return store, values

    for p in model.parameters():
        p.requires_grad_(False)
    _, _ = run(corrupt, False)
    corrupt_inputs, _ = run(corrupt, False)
    model.get_input_embeddings().weight.requires_grad_(True)  # start the autograd graph
    with apply_rules(model, rules):
        clean_inputs, values = run(clean, True)
        grads = torch.autograd.grad(values.sum(), clean_inputs)
    model.get_input_embeddings().weight.requires_grad_(False)
    return [((c - r) * g).sum().item() / clean.shape[0]
            for c, r, g in zip(clean_inputs, corrupt_inputs, grads)]


@pytest.mark.parametrize("family,rules", [("gpt2", "relp"), ("gpt2", "relp-ah"), ("llama", "relp"),
                                          ("llama", "none")])
def test_relp_edge_sums_match_library_coefficients(family, rules):
    model, graph, (clean, corrupt, mask) = _setup(family)
    method = "eap" if rules == "none" else rules
    scores = edge_scores(model, graph, clean, corrupt, METRIC, mask, method=method).scores
    expected = _library_node_scores(model, family, clean, corrupt, mask, rules)
    slots = [graph.attn_slots(0), graph.mlp_slot(0), graph.attn_slots(1), graph.mlp_slot(1), graph.logits_slot]
    # float64: measured 2e-15 relative. Llama's RMSNorm normalises in float32, so its plain gradient
    # (rules "none") carries float32 rounding (measured 2e-8); the LN-rule's scale is float64
    rel = 1e-7 if (family, rules) == ("llama", "none") else 1e-12
    for slot, value in zip(slots, expected):  # attention: all q, k, v inputs of the layer together
        assert scores[:, slot].sum().item() == pytest.approx(value, rel=rel, abs=1e-13)


def test_per_position_scores_sum_to_totals_and_exact_matches_patching():
    model, graph, (clean, corrupt, mask) = _setup()
    total = edge_scores(model, graph, clean, corrupt, METRIC, mask, method="relp").scores
    per_position = edge_scores(model, graph, clean, corrupt, METRIC, mask, method="relp", per_position=True)
    assert per_position.scores.shape == (clean.shape[1], *graph.edge_mask.shape)
    torch.testing.assert_close(per_position.scores.sum(0), total)
    exact = exact_edge_scores(model, graph, clean, corrupt, METRIC, mask, max_rows=20)
    with torch.no_grad():
        reference = graph_forward(model, graph, corrupt, mask).outputs
        clean_value = METRIC(graph_forward(model, graph, clean, mask).logits).mean()
        for u, v in graph.edges()[::17]:
            patched = _patched_metric(model, graph, clean, mask, reference, u, v, 1.0)
            assert exact.scores[u, v].item() == pytest.approx((clean_value - patched).item(), abs=1e-10)
    assert exact.n_forward == 2 + -(-graph.n_edges // 6)


@pytest.mark.parametrize("method", ["eap", "relp"])
def test_pairs_of_different_lengths_score_as_the_mean_of_each_pair(method):
    """Why ``edges --task FILE`` needs no shared layout across pairs (``circuit`` does): the edge
    scores of a batch of right-padded pairs of different lengths are the mean of each pair's own."""
    from captum_relp.embedded import load_embedded
    from captum_relp.tasks.file_encode import encode_task
    from captum_relp.tasks.file_task import TaskPair

    model, tok = load_embedded("tiny-gpt2-ioi")
    short, long = "Then, John gave a ring to", "Then, Mary and John went to the store. John gave a ring to"
    pairs = [TaskPair(short, short.replace("John", "Anna"), answer=" Mary", foil=" John"),
             TaskPair(long, long.replace("John", "Anna").replace("Mary and", "Tom and Mary and"),
                      answer=" Mary", foil=" John")]  # 8 tokens; 16 clean against 18 corrupted
    graph = build_graph(model)

    def scores(rows):
        batch = encode_task(rows, tok)
        return edge_scores(model, graph, batch.clean_ids, batch.corrupt_ids, batch.metric(), batch.attention_mask,
                           method=method).scores

    both = scores(pairs)
    alone = (scores(pairs[:1]) + scores(pairs[1:])) / 2
    kept = torch.isfinite(both)
    assert encode_task(pairs, tok).attention_mask.sum(1).tolist() == [8, 18]
    assert torch.equal(kept, torch.isfinite(alone)) and alone[kept].abs().max() > 1
    torch.testing.assert_close(both[kept], alone[kept], rtol=0, atol=5e-5)
