"""Circuit discovery: SAE splice exactness, faithfulness bounds, a planted circuit recovered."""
import pytest
import torch
from tests.conftest import build_model, model_state, token_pair

from captum_relp.circuits.effects import mean_effects, node_effects
from captum_relp.circuits.faithfulness import evaluate_circuits
from captum_relp.circuits.nodes import NodeSpace, node_means
from captum_relp.metrics import logit_diff


class _ToyDictionary(torch.nn.Module):
    def __init__(self, width, size, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(width, size, generator=generator) / width ** 0.5)
        self.W_dec = torch.nn.Parameter(torch.randn(size, width, generator=generator) / size ** 0.5)

    def encode(self, x):
        return torch.relu(x @ self.W_enc)

    def decode(self, f):
        return f @ self.W_dec


def _dictionaries(model, width=32, size=48):
    n_layers = len(NodeSpace(model, "components").groups) // 2
    return {f"{kind}_{layer}": _ToyDictionary(width, size, seed=layer * 3 + i)
            for layer in range(n_layers) for i, kind in enumerate(("resid", "attn", "mlp"))}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sae_splice_leaves_output_unchanged_and_model_restored(family):
    model = build_model(family)
    clean, _ = token_pair()
    space = NodeSpace(model, "features", _dictionaries(model))
    before = model_state(model)
    with torch.no_grad():
        reference = model(clean).logits
        with space.active():
            spliced = model(clean).logits
    assert torch.equal(spliced, reference)
    assert model_state(model) == before
    assert not any("relp_sae" in name for name, _ in model.named_modules())


def test_feature_effects_have_sae_shape_and_cost_of_two_forwards_one_backward():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    space = NodeSpace(model, "features", _dictionaries(model))
    run = node_effects(space, "relp", clean, corrupt, logit_diff([1, 2, 3], [4, 5, 6]))
    assert run.effects["mlp_1.features"].shape == (3, clean.shape[1], 48)
    assert run.effects["resid_0.error"].shape == (3, clean.shape[1], 1)
    assert (run.forward_passes, run.backward_passes) == (2, 1)
    ig = node_effects(space, "ig", clean, corrupt, logit_diff([1, 2, 3], [4, 5, 6]), n_steps=4)
    # Captum's LayerIntegratedGradients per group: clean + corrupt layer evaluation, then n_steps rows
    assert (ig.forward_passes, ig.backward_passes) == (len(space.groups) * (2 + 4), len(space.groups) * 4)


def _planted_model(neuron=5):
    """Attention writes nothing and only MLP neuron ``neuron`` of layer 1 reaches the output."""
    model = build_model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_()
        model.transformer.h[1].mlp.c_proj.weight[neuron] = torch.randn(32) * 3
    return model


@pytest.mark.parametrize("method", ["relp", "atp", "ig"])
def test_planted_neuron_circuit_is_recovered(method):
    model = _planted_model(neuron=5)
    clean, corrupt = token_pair(batch=4, seq=5)
    corrupt[:, -1] = (clean[:, -1] + 7) % 60 + 1  # the last token differs
    metric = logit_diff([1, 2, 3, 4], [9, 10, 11, 12])
    space = NodeSpace(model, "neurons")
    effects = mean_effects(node_effects(space, method, clean, corrupt, metric, n_steps=8).effects)
    flat = effects["mlp_1.neurons"].abs()
    position, unit = divmod(int(flat.argmax()), flat.shape[1])
    assert (position, unit) == (clean.shape[1] - 1, 5)
    assert effects["mlp_0.neurons"].abs().max() == 0

    means = node_means(space, lambda ids: model(ids), [clean])

    def run_metric():
        with torch.no_grad():
            return metric(model(clean).logits).mean()

    curve = evaluate_circuits(space, effects, means, run_metric, budgets=[0, 1, 10**6],
                              exclude_first_third=False)
    assert curve.faithfulness[0] == pytest.approx(0.0)
    assert curve.faithfulness[1] == pytest.approx(1.0, abs=1e-4)   # the planted node alone
    assert curve.completeness[1] == pytest.approx(0.0, abs=1e-4)   # nothing left without it
    assert curve.faithfulness[2] == pytest.approx(1.0, abs=1e-6)   # the full model


def test_faithfulness_of_full_and_empty_feature_circuits():
    model = build_model("gpt2")
    clean, corrupt = token_pair(batch=4)
    metric = logit_diff([1, 2, 3, 4], [5, 6, 7, 8])
    space = NodeSpace(model, "features", _dictionaries(model))
    effects = mean_effects(node_effects(space, "atp", clean, corrupt, metric).effects)
    means = node_means(space, lambda ids: model(ids), [corrupt])

    def run_metric():
        with torch.no_grad():
            return metric(model(clean).logits).mean()

    curve = evaluate_circuits(space, effects, means, run_metric, budgets=[0, 10**6], exclude_first_third=False)
    assert curve.faithfulness == pytest.approx([0.0, 1.0], abs=1e-5)
    assert curve.completeness[0] == pytest.approx(1.0, abs=1e-5)


def test_unknown_node_kind_and_missing_dictionary():
    model = build_model("gpt2")
    with pytest.raises(ValueError, match="nodes must be one of"):
        NodeSpace(model, "heads")
    with pytest.raises(ValueError, match="resid_0"):
        NodeSpace(model, "features", {})


def test_denominator_and_its_standard_error_from_per_example_metric():
    model = build_model("gpt2")
    clean, corrupt = token_pair(batch=4)
    metric = logit_diff([1, 2, 3, 4], [5, 6, 7, 8])
    space = NodeSpace(model, "components")
    effects = mean_effects(node_effects(space, "relp", clean, corrupt, metric).effects)
    means = node_means(space, lambda ids: model(ids), [corrupt])
    seen = []

    def run_metric():
        with torch.no_grad():
            seen.append(metric(model(clean).logits).double())
            return seen[-1]

    curve = evaluate_circuits(space, effects, means, run_metric, budgets=[1], exclude_first_third=False)
    full, empty = seen[0], seen[1]
    assert curve.denominator == pytest.approx(float((full - empty).mean()))
    assert curve.denominator_se == pytest.approx(float((full - empty).std() / 2.0))  # sqrt(4 examples)
    assert curve.reliable == (abs(curve.denominator) >= 3 * curve.denominator_se)
    assert curve.faithfulness[0] == pytest.approx(float((seen[2] - empty).mean()) / curve.denominator)


def test_small_denominator_is_flagged_and_marked_in_the_plot(tmp_path):
    from captum_relp.circuits.faithfulness import CircuitCurve
    from captum_relp.plotting import plot_faithfulness

    noisy = CircuitCurve([1, 10], [1.0, 0.1], [21.0, 3.0], [-21.0, 0.0], 1.00, 0.99, denominator_se=0.02)
    solid = CircuitCurve([1, 10], [1.0, 0.1], [0.4, 0.9], [0.6, 0.1], 3.0, 0.5, denominator_se=0.1)
    assert not noisy.reliable and solid.reliable
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.legend

    def legend(fig, *args, **kwargs):
        captured["labels"] = [h.get_label() for h in kwargs["handles"]]
        return original(fig, *args, **kwargs)

    plt.Figure.legend = legend
    try:
        plot_faithfulness({"across_pp": {"RelP": noisy, "AtP": noisy}, "within_rc": {"RelP": solid, "AtP": solid}},
                          tmp_path / "f.png", "m: SVA circuits")
    finally:
        plt.Figure.legend = original
    assert captured["labels"] == ["AtP (mean)", "RelP (mean)", "across_pp (noisy denominator)", "within_rc"]


def test_nodes_without_a_finite_effect_are_never_in_a_circuit():
    model = build_model("gpt2")
    clean, corrupt = token_pair(batch=2)
    metric = logit_diff([1, 2], [5, 6])
    space = NodeSpace(model, "components")
    effects = mean_effects(node_effects(space, "atp", clean, corrupt, metric).effects)
    means = node_means(space, lambda ids: model(ids), [corrupt])
    name = next(iter(effects))
    effects[name] = effects[name].clone()
    effects[name].view(-1)[0] = float("nan")
    finite = [float(e.abs()[e.isfinite()].max()) for e in effects.values()]

    def run_metric():
        with torch.no_grad():
            return metric(model(clean).logits).mean()

    curve = evaluate_circuits(space, effects, means, run_metric, budgets=[1], exclude_first_third=False)
    assert curve.thresholds == [max(finite)]  # the largest finite |effect|, not the nan node
    with pytest.raises(ValueError, match="1 of the .* nodes are unscored"):
        evaluate_circuits(space, effects, means, run_metric, budgets=[10**6], exclude_first_third=False)
