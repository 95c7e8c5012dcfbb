"""IG patching: equal to Captum's LayerIntegratedGradients, complete, same layout as RelP."""
import torch
from captum.attr import LayerIntegratedGradients
from tests.conftest import build_model, token_pair

from captum_relp import (
    LayerActivationPatching,
    LayerIntegratedGradientsPatching,
    logit_diff,
    model_components,
)


def test_matches_captum_layer_integrated_gradients():
    model = build_model("gpt2")
    clean, corrupt = token_pair()
    layer = model_components(model).mlp[1]
    ours = LayerIntegratedGradientsPatching(model, layer).attribute(clean, baselines=corrupt, target=5, n_steps=8)

    def forward(ids):
        return model(ids).logits[:, -1]

    captums = LayerIntegratedGradients(forward, layer).attribute(
        clean, baselines=corrupt, target=5, n_steps=8)
    torch.testing.assert_close(ours, captums, rtol=1e-4, atol=1e-6)


def test_completeness_against_whole_layer_patching():
    model = build_model("llama")
    clean, corrupt = token_pair()
    metric = logit_diff([1, 2, 3], [4, 5, 6])
    layers, flags, _ = model_components(model).select(["resid", "mlp"])
    ig = LayerIntegratedGradientsPatching(model, layers).attribute(
        clean, baselines=corrupt, metric=metric, attribute_to_layer_input=flags, n_steps=32)
    ap = LayerActivationPatching(model, layers).attribute(
        clean, baselines=corrupt, metric=metric, attribute_to_layer_input=flags, granularity="layer")
    for scores, effect in zip(ig, ap):
        torch.testing.assert_close(scores.sum(dim=(1, 2)), effect, rtol=2e-3, atol=2e-4)
