"""The component graph is exact: no patch = clean run, all edges patched = corrupt run,
and one edge patched by hand (hooks on the Hugging Face model) = the library's edge patching."""
import pytest
import torch
import transformers

from captum_relp.edges import build_graph, graph_forward
from tests.conftest import build_model

CASES = ("gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "qwen2")


def _model(case):
    if case == "gpt_neox_sequential":
        torch.manual_seed(0)
        config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=32, vocab_size=64,
                                            use_parallel_residual=False)
        model = transformers.GPTNeoXForCausalLM(config).eval()
    else:
        model = build_model(case)
    return model.double()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(64, (3, 6), generator=gen)
    corrupt = torch.randint(64, (3, 6), generator=gen)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return clean, corrupt, mask


def _close(a, b, mask):
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_no_patch_is_clean_and_full_patch_is_corrupt(case):
    model = _model(case)
    graph = build_graph(model)
    clean, corrupt, mask = _inputs()
    with torch.no_grad():
        reference = graph_forward(model, graph, corrupt, mask)
        _close(reference.logits, model(corrupt, attention_mask=mask).logits, mask)
        _close(graph_forward(model, graph, clean, mask).logits, model(clean, attention_mask=mask).logits, mask)
        nothing = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
        run = graph_forward(model, graph, clean, mask, patch=nothing, corrupt_outputs=reference.outputs)
        _close(run.logits, model(clean, attention_mask=mask).logits, mask)
        everything = graph.edge_mask.double()
        run = graph_forward(model, graph, clean, mask, patch=everything, corrupt_outputs=reference.outputs)
        _close(run.logits, model(corrupt, attention_mask=mask).logits, mask)
        assert not torch.allclose(run.logits, model(clean, attention_mask=mask).logits)


def test_graph_shapes_and_edges():
    gpt2 = build_graph(_model("gpt2"))
    neox = build_graph(_model("gpt_neox"))
    llama = build_graph(_model("llama"))
    # 2 layers x 4 heads; GPT-2: a0 q/k/v read input (12), m0 reads input + a0 (5), layer 1 reads 6 nodes
    assert gpt2.n_edges == 12 + 5 + 12 * 6 + 10 + 11
    assert neox.parallel and neox.n_edges == gpt2.n_edges - 8  # no a{l}.h* -> m{l}
    assert not build_graph(_model("gpt_neox_sequential")).parallel
    assert llama.n_kv_heads == 2 and llama.slots_per_layer == 4 + 4 + 1
    assert llama.edge_name(llama.head_node(0, 3), llama.attn_slots(1).start + 5) == "a0.h3->a1.h1<k>"
    assert not gpt2.edge_mask[gpt2.mlp_node(1), :gpt2.logits_slot].any()
    with pytest.raises(ValueError, match="model types"):
        build_graph(build_model("bert"))


def _attn_out_proj(model, case, layer):
    if case == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    if case.startswith("gpt_neox"):
        return model.gpt_neox.layers[layer].attention.dense
    return model.model.layers[layer].self_attn.o_proj


def _mlp_norm(model, case, layer):
    if case == "gpt2":
        return model.transformer.h[layer].ln_2
    if case.startswith("gpt_neox"):
        return model.gpt_neox.layers[layer].post_attention_layernorm
    return model.model.layers[layer].post_attention_layernorm


def _head_output(model, case, ids, mask, head):
    """Head ``head`` of layer 0 by hand: its slice of the output projection's input times its weights."""
    store = {}
    proj = _attn_out_proj(model, case, 0)
    handle = proj.register_forward_pre_hook(lambda m, args: store.setdefault("z", args[0]))
    model(ids, attention_mask=mask)
    handle.remove()
    width = store["z"].shape[-1] // 4
    z = store["z"][..., head * width:(head + 1) * width]
    weight = proj.weight if case == "gpt2" else proj.weight.t()  # (in, out)
    return z @ weight[head * width:(head + 1) * width]


@pytest.mark.parametrize("case", CASES)
def test_one_edge_by_hand(case):
    model = _model(case)
    graph = build_graph(model)
    clean, corrupt, mask = _inputs()
    head = 2
    with torch.no_grad():
        delta = _head_output(model, case, clean, mask, head) - _head_output(model, case, corrupt, mask, head)
        handle = _mlp_norm(model, case, 1).register_forward_pre_hook(lambda m, args: (args[0] - delta,))
        expected = model(clean, attention_mask=mask).logits
        handle.remove()
        reference = graph_forward(model, graph, corrupt, mask).outputs
        patch = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
        patch[graph.head_node(0, head), graph.mlp_slot(1)] = 1.0
        run = graph_forward(model, graph, clean, mask, patch=patch, corrupt_outputs=reference)
    _close(run.logits, expected, mask)
    assert not torch.allclose(expected, model(clean, attention_mask=mask).logits)


def test_input_to_logits_edge_by_hand():
    model = _model("gpt2")
    graph = build_graph(model)
    clean, corrupt, mask = _inputs()
    positions = torch.arange(clean.shape[1])
    embed = lambda ids: model.transformer.wte(ids) + model.transformer.wpe(positions)  # noqa: E731
    with torch.no_grad():
        delta = embed(clean) - embed(corrupt)
        handle = model.transformer.ln_f.register_forward_pre_hook(lambda m, args: (args[0] - delta,))
        expected = model(clean, attention_mask=mask).logits
        handle.remove()
        patch = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
        patch[0, graph.logits_slot] = 1.0
        # per-row patch matrices: row 0 unpatched, rows 1-2 patched
        rows = patch[None].repeat(3, 1, 1)
        rows[0] = 0
        reference = graph_forward(model, graph, corrupt, mask).outputs
        run = graph_forward(model, graph, clean, mask, patch=rows, corrupt_outputs=reference)
    _close(run.logits[1:], expected[1:], mask[1:])
    _close(run.logits[:1], model(clean, attention_mask=mask).logits[:1], mask[:1])


@pytest.mark.parametrize("case", ["gpt2", "gpt_neox", "llama"])
def test_shared_patch_equals_per_row_patch(case):
    """A ``(U, V)`` patch (one contraction per input) = the same patch given per row (per-node loop)."""
    model = _model(case)
    graph = build_graph(model, ungroup_kv=case == "llama")
    clean, corrupt, mask = _inputs()
    gen = torch.Generator().manual_seed(2)
    tol = 1e-6 if case == "llama" else 1e-12  # LlamaRMSNorm computes in float32 even for float64 inputs
    with torch.no_grad():
        reference = graph_forward(model, graph, corrupt, mask).outputs
        clean_logits = graph_forward(model, graph, clean, mask).logits
        # mostly kept, half, mostly patched (the kept-edge complement), and a fractional patch
        for patch in [(torch.rand(graph.edge_mask.shape, generator=gen) < share).double() for share in (.05, .5, .95)] \
                + [torch.rand(graph.edge_mask.shape, generator=gen)]:
            shared = graph_forward(model, graph, clean, mask, patch=patch, corrupt_outputs=reference)
            rows = patch.expand(clean.shape[0], *patch.shape).contiguous()
            per_row = graph_forward(model, graph, clean, mask, patch=rows, corrupt_outputs=reference)
            torch.testing.assert_close(shared.logits, per_row.logits, rtol=tol, atol=tol)
            assert not torch.allclose(shared.logits, clean_logits)
