"""``convention="mib"`` against an independent re-implementation of MIB's definitions.

Written from MIB's circuit-track ``evaluate_area_under_curve`` and EAP-IG's
``get_scores_eap`` / ``get_scores_eap_ig`` / ``Graph.apply_topn`` / ``Graph.prune`` /
``Graph.apply_greedy`` (hannamw/MIB-circuit-track, EAP-IG pinned at 7af394a), on GPT-2
recomputed as TransformerLens does with split q/k/v inputs and per-head results. Nothing
here imports captum_relp's edge code: the graph layout, the patched forward, the scores
and the curves are rebuilt from the definitions.
"""
import heapq
import json

import pytest
import torch

from captum_relp.edges import build_graph, edge_scores, faithfulness_curve
from tests.conftest import build_model

PERCENTAGES = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)  # MIB evaluate_area_under_curve


class MIBGraph:
    """EAP-IG's Graph layout: forward nodes ``input, a0.h0.., m0, ...``; backward per layer
    ``q (H), k (H), v (H), mlp``, then ``logits``; ``real`` marks real edges."""

    def __init__(self, n_layers, n_heads):
        self.L, self.H = n_layers, n_heads
        self.n_forward = 1 + n_layers * (n_heads + 1)
        self.n_backward = n_layers * (3 * n_heads + 1) + 1
        self.forward_names = ["input"]
        self.backward_names = []
        for layer in range(n_layers):
            self.forward_names += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
            for letter in "qkv":
                self.backward_names += [f"a{layer}.h{h}<{letter}>" for h in range(n_heads)]
            self.backward_names.append(f"m{layer}")
        self.backward_names.append("logits")
        self.real = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        # forward_to_backward: the backward indices that are a forward node's own inputs
        self.f2b = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        for layer in range(n_layers):
            first = 1 + layer * (n_heads + 1)
            base = layer * (3 * n_heads + 1)
            self.real[:first, base:base + 3 * n_heads] = True  # prev_index(attention) = first head of layer
            self.real[:first + n_heads, base + 3 * n_heads] = True  # MLP reads this layer's heads too
            for h in range(n_heads):
                for i in range(3):
                    self.f2b[first + h, base + i * n_heads + h] = True
            self.f2b[first + n_heads, base + 3 * n_heads] = True
        self.real[:, -1] = True

    def edge_names(self):
        return {f"{self.forward_names[u]}->{self.backward_names[v]}": (u, v)
                for u, v in self.real.nonzero().tolist()}

    def prev_index(self, kind, layer):
        first = 1 + layer * (self.H + 1)
        return {"attn": first, "mlp": first + self.H, "logits": self.n_forward}[kind]


def tl_forward(model, g, ids, mask, corrupt_acts=None, not_in_graph=None, input_acts=None):
    """GPT-2 as TransformerLens runs it with ``use_split_qkv_input``/``use_attn_result``/``use_hook_mlp_in``,
    with EAP-IG's input-construction hooks: each downstream input gets ``+ sum_u (1 - in_graph[u, v])
    * (corrupt_u - current_u)``. Returns logits, the node outputs ``(B, T, n_forward, d)`` and the
    downstream inputs (autograd-connected). evaluate_graph skips the hooks of layers with no node
    in the (pruned) circuit; those nodes' outputs are patched everywhere, so applying them is the same."""
    base = model.transformer
    B, T = ids.shape
    H = g.H
    outs = []
    inputs = []
    embed = base.wte(ids) + base.wpe(torch.arange(T)[None].expand(B, T))
    outs.append(embed if input_acts is None else input_acts)
    resid = outs[0]
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]

    def construct(x, prev, columns):  # x: (B, T, n, d); columns: backward indices
        if not_in_graph is None:
            return x
        diff = corrupt_acts[:, :, :prev] - torch.stack(outs, 2)[:, :, :prev]
        return x + torch.einsum("btfd,fn->btnd", diff, not_in_graph[:prev][:, columns])

    for layer, block in enumerate(base.h):
        b0 = layer * (3 * H + 1)
        prev = g.prev_index("attn", layer)
        qkv_in = [construct(resid[:, :, None].expand(B, T, H, -1), prev, list(range(b0 + i * H, b0 + (i + 1) * H)))
                  for i in range(3)]
        inputs += qkv_in
        d = resid.shape[-1]
        D = d // H
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        proj = []
        for i, x in enumerate(qkv_in):
            wi = w[:, i * d:(i + 1) * d].reshape(d, H, D)
            bi = b[i * d:(i + 1) * d].reshape(H, D)
            proj.append(torch.einsum("bthd,dhe->bhte", block.ln_1(x), wi) + bi[None, :, None])
        q, k, v = proj
        att = (q @ k.transpose(-1, -2)) / D ** 0.5
        att = torch.where(keep, att, torch.finfo(att.dtype).min).softmax(-1)
        z = att @ v  # (B, H, T, D)
        w_o = block.attn.c_proj.weight.reshape(H, D, d)
        result = torch.einsum("bhte,hed->bthd", z, w_o)  # hook_result (no b_O)
        for h in range(H):
            outs.append(result[:, :, h])
        resid = resid + result.sum(2) + block.attn.c_proj.bias
        mlp_in = construct(resid[:, :, None], g.prev_index("mlp", layer), [b0 + 3 * H])[:, :, 0]
        inputs.append(mlp_in)
        mlp_out = block.mlp(block.ln_2(mlp_in))
        outs.append(mlp_out)
        resid = resid + mlp_out
    final = construct(resid[:, :, None], g.n_forward, [g.n_backward - 1])[:, :, 0]
    inputs.append(final)
    logits = model.lm_head(base.ln_f(final))
    return logits, torch.stack(outs, 2), inputs


def logit_diff(logits, batch):
    rows = torch.arange(logits.shape[0])
    last = logits[rows, batch["last"]]
    return last[rows, batch["good"]] - last[rows, batch["bad"]]


def _scores_from_grads(g, diff, grads):
    """EAP-IG's gradient_hook: scores[:prev, bwd] += einsum(diff[:, :, :prev], grads)."""
    scores = torch.zeros(g.n_forward, g.n_backward, dtype=diff.dtype)
    H = g.H
    for layer in range(g.L):
        b0 = layer * (3 * H + 1)
        for i in range(3):
            prev = g.prev_index("attn", layer)
            scores[:prev, b0 + i * H:b0 + (i + 1) * H] += torch.einsum(
                "btfd,bthd->fh", diff[:, :, :prev], grads[4 * layer + i])
        prev = g.prev_index("mlp", layer)
        scores[:prev, b0 + 3 * H] += torch.einsum("btfd,btd->f", diff[:, :, :prev], grads[4 * layer + 3])
    scores[:, -1] += torch.einsum("btfd,btd->f", diff, grads[-1])
    return scores


def mib_scores(model, g, batch, steps=None, ks=None):
    """get_scores_eap (steps None) / get_scores_eap_ig; metric = logit_diff(mean=True, loss=True)."""
    with torch.no_grad():
        _, corrupt_acts, _ = tl_forward(model, g, batch["corrupt"], batch["mask"])
        _, clean_acts, _ = tl_forward(model, g, batch["clean"], batch["mask"])
    diff = corrupt_acts - clean_acts  # activation_difference: corrupted - clean
    ks = [None] if steps is None else (range(0, steps) if ks is None else ks)
    scores = torch.zeros(g.n_forward, g.n_backward, dtype=diff.dtype)
    for k in ks:
        embeds = None
        if k is not None:
            embeds = corrupt_acts[:, :, 0] + (k / steps) * (clean_acts[:, :, 0] - corrupt_acts[:, :, 0])
            embeds.requires_grad = True  # input_interpolation_hook
        logits, _, inputs = tl_forward(model, g, batch["clean"], batch["mask"], input_acts=embeds)
        loss = -logit_diff(logits, batch).mean()
        grads = torch.autograd.grad(loss, inputs)
        scores += _scores_from_grads(g, diff, grads)
    return scores / len(batch["clean"]) / len(ks)


def mib_prune(g, in_graph, nodes_in_graph):
    """Graph.prune (pinned): loop until the node set stops changing."""
    old_new_same = False
    while not old_new_same:
        nodes_with_outgoing = in_graph.any(dim=1)
        nodes_with_ingoing = (in_graph.any(dim=0).float() @ g.f2b.float().T) > 0
        nodes_with_ingoing[0] = True
        new_nodes = nodes_with_outgoing & nodes_with_ingoing
        old_new_same = bool(torch.all(new_nodes == nodes_in_graph))
        nodes_in_graph = new_nodes
        backward_in_graph = nodes_in_graph.float() @ g.f2b.float()
        backward_in_graph[-1] = 1
        in_graph = in_graph & ((nodes_in_graph.float()[:, None] * backward_in_graph[None, :]) > 0)
    return in_graph, nodes_in_graph


def mib_apply_topn(g, scores, n, absolute):
    values = scores.abs() if absolute else scores.clone()
    values[~g.real] = -torch.inf
    order = torch.argsort(values.view(-1), descending=True)
    in_graph = torch.zeros(g.real.numel(), dtype=torch.bool)
    in_graph[order[:n]] = True
    in_graph = in_graph.view(g.real.shape)
    nodes_with_ingoing = (in_graph.any(dim=0).float() @ g.f2b.float().T) > 0
    nodes_with_ingoing[0] = True
    nodes = in_graph.any(dim=1) & nodes_with_ingoing
    in_graph, nodes = mib_prune(g, in_graph, nodes)  # apply_topn(prune=True)
    return mib_prune(g, in_graph, nodes)[0]  # evaluate_graph prunes again


def mib_apply_greedy(g, scores, n, absolute):
    key = (lambda s: abs(s)) if absolute else (lambda s: s)
    nodes = torch.zeros(g.n_forward, dtype=torch.bool)
    in_graph = torch.zeros_like(g.real)
    edges = [(u, v) for u, v in g.real.nonzero().tolist()]
    score = {e: float(scores[e]) for e in edges}
    candidates = sorted([e for e in edges if e[1] == g.n_backward - 1], key=lambda e: key(score[e]), reverse=True)
    stream = heapq.merge(candidates, key=lambda e: key(score[e]), reverse=True)
    while n > 0:
        n -= 1
        u, v = next(stream)
        in_graph[u, v] = True
        if not nodes[u]:
            nodes[u] = True
            parents = sorted([e for e in edges if g.f2b[u, e[1]]], key=lambda e: key(score[e]), reverse=True)
            stream = heapq.merge(stream, parents, key=lambda e: key(score[e]), reverse=True)
    in_graph, nodes = mib_prune(g, in_graph, nodes)
    return mib_prune(g, in_graph, nodes)[0]


def mib_area_under_curve(model, g, scores, batch, absolute, greedy=False):
    """evaluate_area_under_curve(level='edge', log_scale=False, intervention='patching')."""
    with torch.no_grad():
        _, corrupt_acts, _ = tl_forward(model, g, batch["corrupt"], batch["mask"])
        baseline = logit_diff(tl_forward(model, g, batch["clean"], batch["mask"])[0], batch).mean().item()

        def evaluate(in_graph):
            logits = tl_forward(model, g, batch["clean"], batch["mask"], corrupt_acts,
                                (~in_graph & g.real).to(corrupt_acts.dtype))[0]
            return logit_diff(logits, batch).mean().item()

        corrupted = evaluate(mib_apply_topn(g, scores, 0, True))
        n_items = int(g.real.sum())
        faithfulnesses = []
        for pct in PERCENTAGES:
            n = int(pct * n_items)
            select = mib_apply_greedy if greedy else mib_apply_topn
            faithfulnesses.append((evaluate(select(g, scores, n, absolute)) - corrupted) / (baseline - corrupted))
    area_under, area_from_1 = 0.0, 0.0
    for i in range(len(faithfulnesses) - 1):
        x_1, x_2 = PERCENTAGES[i], PERCENTAGES[i + 1]
        area_from_1 += (x_2 - x_1) * ((abs(1. - faithfulnesses[i]) + abs(1. - faithfulnesses[i + 1])) / 2)
        area_under += (x_2 - x_1) * ((faithfulnesses[i] + faithfulnesses[i + 1]) / 2)
    return area_under, area_from_1, faithfulnesses


def _batch():
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(64, (4, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(64, (4,), generator=gen)
    corrupt[:, 4] = torch.randint(64, (4,), generator=gen)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    last = mask.sum(1) - 1
    return {"clean": clean, "corrupt": corrupt, "mask": mask, "last": last,
            "good": torch.tensor([3, 5, 7, 9]), "bad": torch.tensor([4, 6, 8, 10])}


def _library_metric(batch):
    return lambda logits: logit_diff(logits, batch)


def _to_mib(g, graph, matrix):
    names = g.edge_names()
    out = torch.zeros(g.n_forward, g.n_backward, dtype=torch.float64)
    for u, v in graph.edges():
        out[names[graph.edge_name(u, v)]] = matrix[u, v]
    assert len(names) == graph.n_edges
    return out


@pytest.fixture(scope="module")
def setup():
    model = build_model("gpt2").double()
    return model, build_graph(model, ungroup_kv=True), MIBGraph(2, 4), _batch()


@pytest.mark.parametrize("method,steps", [("eap", None), ("eap-ig", 5), ("eap-ig", 3)])
def test_scores_equal_eap_ig_definition(setup, method, steps):
    model, graph, g, batch = setup
    ours = edge_scores(model, graph, batch["clean"], batch["corrupt"], _library_metric(batch), batch["mask"],
                       method=method, n_steps=steps or 5, ig_grid="left").scores
    theirs = mib_scores(model, g, batch, steps)
    # MIB averages the metric over the batch before the backward pass, then divides by the prompt count
    torch.testing.assert_close(_to_mib(g, graph, ours) / len(batch["clean"]), theirs, rtol=1e-6, atol=1e-12)
    assert theirs.abs().max() > 1e-3


def test_right_grid_is_the_papers_and_differs_from_the_left(setup):
    model, graph, g, batch = setup
    args = (model, graph, batch["clean"], batch["corrupt"], _library_metric(batch), batch["mask"])
    right = edge_scores(*args, method="eap-ig", n_steps=3, ig_grid="right").scores
    left = edge_scores(*args, method="eap-ig", n_steps=3, ig_grid="left").scores
    theirs_right = mib_scores(model, g, batch, 3, ks=[1, 2, 3])
    torch.testing.assert_close(_to_mib(g, graph, right) / 4, theirs_right, rtol=1e-6, atol=1e-12)
    assert (right - left).abs().max() > 1e-3 * right.abs().max()


@pytest.mark.parametrize("greedy", [False, True])
def test_cpr_cmd_equal_evaluate_area_under_curve(setup, greedy):
    model, graph, g, batch = setup
    scores = edge_scores(model, graph, batch["clean"], batch["corrupt"], _library_metric(batch), batch["mask"],
                         method="eap-ig", ig_grid="left").scores
    curve = faithfulness_curve(model, graph, scores, batch["clean"], batch["corrupt"], _library_metric(batch),
                               batch["mask"], convention="mib", greedy=greedy)
    mib_scores_matrix = _to_mib(g, graph, scores)
    cpr, _, f_signed = mib_area_under_curve(model, g, mib_scores_matrix, batch, absolute=False, greedy=greedy)
    _, cmd, f_abs = mib_area_under_curve(model, g, mib_scores_matrix, batch, absolute=True, greedy=greedy)
    assert curve.cpr == pytest.approx(cpr, abs=1e-6)
    assert curve.cmd == pytest.approx(cmd, abs=1e-6)
    assert curve.faithfulness == pytest.approx(f_abs, abs=1e-6)
    assert curve.faithfulness_cpr == pytest.approx(f_signed, abs=1e-6)
    assert f_signed != pytest.approx(f_abs, abs=1e-3)  # signed and |score| circuits do differ here


def test_cli_mib_convention_equals_the_definition(tmp_path, monkeypatch):
    """``captum-relp edges --convention mib`` on tiny-gpt2-ioi: its CPR/CMD are MIB's on its own scores."""
    from captum_relp.cli import edges as cli_edges
    from captum_relp.cli import main
    from captum_relp.embedded import heldout_words, load_embedded
    from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs

    loader = cli_edges.load_model_from_args
    monkeypatch.setattr(cli_edges, "load_model_from_args", lambda args: (lambda m, t: (m.double(), t))(*loader(args)))
    code = main(["edges", "--model", "tiny-gpt2-ioi", "--convention", "mib", "--method", "eap-ig", "--no-exact",
                 "--n-prompts", "6", "--n-eval", "6", "--repeats", "1", "--no-plots", "--quiet",
                 "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "edges_results.json").read_text())
    assert data["meta"]["convention"]["name"] == "mib" and data["meta"]["convention"]["ig_grid"] == "left"
    model, tok = load_embedded("tiny-gpt2-ioi")
    model = model.double()
    cfg = model.config
    g = MIBGraph(cfg.n_layer, cfg.n_head)
    names = g.edge_names()
    assert sorted(names) == sorted(data["meta"]["edges"])
    pairs = generate_ioi_pairs(6, seed=1, names=heldout_words("tiny-gpt2-ioi", "ioi"), tokenizer=tok)
    held = encode_ioi(pairs, tok)
    batch = {"clean": held.clean_ids, "corrupt": held.corrupt_ids, "mask": held.attention_mask,
             "last": held.last_pos, "good": held.io_ids, "bad": held.s_ids}
    for method in ("eap-ig", "eap"):
        scores = torch.zeros(g.n_forward, g.n_backward, dtype=torch.float64)
        for name, value in zip(data["meta"]["edges"], data[method]["scores"]):
            scores[names[name]] = value
        cpr, _, f_signed = mib_area_under_curve(model, g, scores, batch, absolute=False)
        _, cmd, f_abs = mib_area_under_curve(model, g, scores, batch, absolute=True)
        assert data[method]["cpr"] == pytest.approx(cpr, abs=1e-6)
        assert data[method]["cmd"] == pytest.approx(cmd, abs=1e-6)
        assert data[method]["curve"]["faithfulness_cpr"] == pytest.approx(f_signed, abs=1e-6)
        assert data[method]["curve"]["n_edges"] == [int(p * 479) for p in PERCENTAGES]
