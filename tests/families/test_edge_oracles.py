"""Edge oracles over every family with an edge graph, on the tiny configs, in float64.

* Exact patching of one edge (``exact_edge_scores``) equals the effect recomputed with hooks on
  the Hugging Face model (:func:`tests.families.edge_oracles.hook_edge_effect`), to 1e-10 with the
  family's norms computing in float64 (to 1e-6 as shipped, where they compute in float32).
* Edge scores agree with node scores: the scores of a node's edges summed over all its downstream
  inputs equal the node-level score of the module whose output is what the node adds to the
  residual stream (EAP against AtP, RelP against LayerRelevancePatching with the same rules).
"""
import contextlib

import pytest
import torch

from captum_relp import LayerAttributionPatching, LayerRelevancePatching
from captum_relp.edges import build_graph, edge_scores, exact_edge_scores
from captum_relp.families import FAMILY_TABLE
from captum_relp.metrics import LogitDiff
from tests.families.configs import tiny_model, token_pair
from tests.families.edge_oracles import float64_norms, hook_edge_effect, node_modules

EDGE_FAMILIES = sorted(t for t, f in FAMILY_TABLE.items() if f.edges is not None)
METRIC = LogitDiff([5, 6], [7, 8], positions=[6, 4])
EDGES = ("input->a1.h0<q>", "a0.h1->a1.h1<k>", "m0->a1.h0<v>", "a0.h3->m0", "a0.h2->m1", "input->m1",
         "m0->logits", "a1.h1->logits", "a0.h0->a1.h3<q>")


def _float32_norms(model_type: str) -> bool:
    return any(norm.float32 and norm.rms for norm in FAMILY_TABLE[model_type].norms)


def exact_vs_hooks(model_type: str, float64: bool, **overrides) -> float:
    """Max |exact_edge_scores - hook recomputation| over :data:`EDGES` that the graph has."""
    context = float64_norms(model_type) if float64 else contextlib.nullcontext()
    with context:
        model = tiny_model(model_type, **overrides)
        clean, corrupt, mask = token_pair()
        graph = build_graph(model)
        names = {graph.edge_name(u, v): (u, v) for u, v in graph.edges()}
        chosen = [e for e in EDGES if e in names]
        subset = torch.zeros_like(graph.edge_mask)
        for e in chosen:
            subset[names[e]] = True
        exact = exact_edge_scores(model, graph, clean, corrupt, METRIC, mask, edges=subset).scores
        effects = [hook_edge_effect(model, METRIC, clean, corrupt, mask, *e.split("->")) for e in chosen]
    assert len(chosen) >= 7, chosen
    assert min(abs(e) for e in effects) > 1e-12, effects  # every chosen edge has an effect to compare
    return max(abs(exact[names[e]].item() - effect) for e, effect in zip(chosen, effects))


@pytest.mark.parametrize("model_type", EDGE_FAMILIES)
def test_exact_edge_equals_hook_recomputation(model_type):
    assert exact_vs_hooks(model_type, float64=True) < 1e-10
    if _float32_norms(model_type):
        assert exact_vs_hooks(model_type, float64=False) < 1e-6


@pytest.mark.parametrize("model_type,clip", [("olmo", dict(clip_qkv=0.05)),
                                             ("mpt", dict(attn_config={"alibi": True, "clip_qkv": 0.05}))])
def test_exact_edge_with_clamped_qkv(model_type, clip):
    """OLMo's and MPT's ``clip_qkv`` clamps queries, keys and values (0.05: active on the tiny model)."""
    model = tiny_model(model_type, **clip)
    clean, _, mask = token_pair()
    with torch.no_grad():
        assert not torch.equal(model(clean, attention_mask=mask).logits,
                               tiny_model(model_type)(clean, attention_mask=mask).logits)
    assert exact_vs_hooks(model_type, float64=True, **clip) < 1e-10


@pytest.mark.parametrize("model_type,config,reason", [
    ("bloom", dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
    ("opt", dict(do_layer_norm_before=False), "do_layer_norm_before")])
def test_configurations_without_an_edge_graph_are_refused(model_type, config, reason):
    """A norm on the residual stream itself: it is not the sum of the node outputs."""
    with pytest.raises(ValueError, match=reason):
        build_graph(tiny_model(model_type, **config))


def edge_vs_node(model_type: str, method: str, ungroup_kv: bool = False, **overrides) -> float:
    """Max |sum of a node group's edge scores - its node-level score| (groups: input, a{l}, m{l})."""
    model = tiny_model(model_type, **overrides)
    clean, corrupt, mask = token_pair()
    graph = build_graph(model, ungroup_kv=ungroup_kv)
    scores = edge_scores(model, graph, clean, corrupt, METRIC, mask, method=method).scores.sum(dim=1)
    groups, modules = zip(*node_modules(model))
    attr = LayerAttributionPatching(model, list(modules)) if method == "eap" else \
        LayerRelevancePatching(model, list(modules), rules=method)
    nodes = attr.attribute(clean, baselines=corrupt, metric=METRIC, additional_forward_args=(mask,))
    errors = []
    for group, node in zip(groups, nodes):
        rows = [i for i, name in enumerate(graph.upstream) if name == group or name.startswith(group + ".")]
        node = node.reshape(clean.shape[0], -1)  # OPT's MLP output: flattened (B * T, d) rows
        errors.append(abs(scores[rows].sum().item() - node.sum(dim=1).mean().item()))
    return max(errors)


@pytest.mark.parametrize("method", ["eap", "relp", "relp-ah"])
@pytest.mark.parametrize("model_type", EDGE_FAMILIES)
def test_edge_scores_sum_to_node_scores(model_type, method):
    assert edge_vs_node(model_type, method) < 1e-6


@pytest.mark.parametrize("model_type", EDGE_FAMILIES)
def test_ungrouped_edge_scores_sum_to_node_scores(model_type):
    """One key and value input per query head (MIB): each through its group's weights and norms."""
    assert edge_vs_node(model_type, "relp", ungroup_kv=True) < 1e-6


def test_sequential_stablelm():
    """StableLM without ``use_parallel_residual``: the MLP reads its own norm after attention."""
    assert exact_vs_hooks("stablelm", float64=True, use_parallel_residual=False) < 1e-10
    assert edge_vs_node("stablelm", "relp", use_parallel_residual=False) < 1e-6


def test_gpt_bigcode_without_multi_query():
    """GPT-BigCode with a key and value per head: its projection holds ``[q k v]`` per head."""
    assert exact_vs_hooks("gpt_bigcode", float64=True, multi_query=False) < 1e-10
    assert edge_vs_node("gpt_bigcode", "relp", multi_query=False) < 1e-6


@pytest.mark.parametrize("config", [dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
                                    dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, num_kv_heads=4),
                                    dict(new_decoder_architecture=True, num_kv_heads=2, alibi=True),
                                    dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1)])
def test_falcon_variants(config):
    """Falcon's layouts (multi-query, per head, grouped), norms (one, two, sequential) and ALiBi."""
    assert exact_vs_hooks("falcon", float64=True, **config) < 1e-10
    assert edge_vs_node("falcon", "relp", **config) < 1e-6


def test_opt_with_embedding_projections():
    """OPT with ``word_embed_proj_dim`` below the hidden size: ``project_in`` and ``project_out``."""
    assert exact_vs_hooks("opt", float64=True, word_embed_proj_dim=8) < 1e-10
    assert edge_vs_node("opt", "relp", word_embed_proj_dim=8) < 1e-6


def test_split_through_norm_where_the_heads_cancel():
    """Where the heads' sum is exactly zero, the shares still sum to the norm's output (zero there)
    and each is the head's term times the norm's factor."""
    from captum_relp.edges._parts import split_through_norm

    norm = torch.nn.RMSNorm(4, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    out = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out[..., 1, 1], out[..., 2, 1] = -out[..., 0, 1], 0.0  # coordinate 1: the heads cancel exactly
    assert (out.sum(2)[..., 1] == 0).all()
    shares = split_through_norm(norm, out)
    torch.testing.assert_close(shares.sum(2), norm(out.sum(2)), rtol=0, atol=1e-15)
    s = out.sum(2)
    factor = norm.weight * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(shares, out * factor[:, :, None], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("model_type", EDGE_FAMILIES)
def test_every_method_runs(model_type):
    """EAP-IG, RelP-AH with q/k edges (one pass and two) give finite scores on every edge family."""
    model = tiny_model(model_type)
    clean, corrupt, mask = token_pair()
    graph = build_graph(model)
    for method in ("eap-ig", "relp-ah-qk", "relp-ah+qk"):
        scores = edge_scores(model, graph, clean, corrupt, METRIC, mask, method=method, n_steps=2).scores
        assert torch.isfinite(scores).all() and scores[graph.edge_mask].abs().sum() > 0, method


def per_head_edge_vs_node(model_type: str, method: str) -> float:
    """Max |sum of a head's edge scores - its node-level score at the output projection's input,
    summed per head| (the projection takes the plain gradient under every rule set)."""
    model = tiny_model(model_type)
    clean, corrupt, mask = token_pair()
    graph = build_graph(model)
    scores = edge_scores(model, graph, clean, corrupt, METRIC, mask, method=method).scores.sum(dim=1)
    family = FAMILY_TABLE[model_type]
    blocks = model.base_model.get_submodule(family.blocks)
    layers = [block.get_submodule(family.o_proj) for block in blocks]
    attr = LayerAttributionPatching(model, layers) if method == "eap" else \
        LayerRelevancePatching(model, layers, rules=method)
    nodes = attr.attribute(clean, baselines=corrupt, metric=METRIC, additional_forward_args=(mask,),
                           attribute_to_layer_input=True, reduce="heads", num_heads=graph.n_heads)
    return max(abs(scores[graph.head_node(layer, h)].item() - node[..., h].sum(1).mean().item())
               for layer, node in enumerate(nodes) for h in range(graph.n_heads))


@pytest.mark.parametrize("method", ["eap", "relp", "relp-ah"])
@pytest.mark.parametrize("model_type", [t for t in EDGE_FAMILIES if not FAMILY_TABLE[t].edges.post_norms])
def test_head_edge_scores_sum_to_head_scores(model_type, method):
    """Per head, where a head's output is its term of the output projection (no post-norm)."""
    assert per_head_edge_vs_node(model_type, method) < 1e-6
