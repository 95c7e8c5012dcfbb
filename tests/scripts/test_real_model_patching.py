"""The activation patching of ``make_results.py --real-model`` (scripts/_real_model.py) is exact."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from _real_model import layered_role_patching, role_patching  # noqa: E402

from captum_relp import LayerActivationPatching, model_components  # noqa: E402
from captum_relp.models import COMPONENT_KINDS  # noqa: E402


class _Batch:
    """The part of an IOI/SVA batch the patching uses: ids, mask, rows, a logit-difference metric."""

    def __init__(self, clean, corrupt):
        self.clean_ids, self.corrupt_ids = clean, corrupt
        self.attention_mask = torch.ones_like(clean)

    def __len__(self):
        return self.clean_ids.shape[0]

    def select(self, index):
        return _Batch(self.clean_ids[index], self.corrupt_ids[index])

    def metric(self):
        return lambda logits: logits[:, -1, 1] - logits[:, -1, 2]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).double().eval()
    clean = torch.randint(3, 40, (2, 7))
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 5) % 37 + 3
    corrupt[:, 4] = (clean[:, 4] + 7) % 37 + 3
    return model, _Batch(clean, corrupt)


def test_both_equal_library_activation_patching(setup):
    model, batch = setup
    positions = [[2, 4, 6], [1, 4, 6]]
    layers, flags, _ = model_components(model).select(COMPONENT_KINDS)
    library = LayerActivationPatching(model, layers).attribute(
        batch.clean_ids, baselines=batch.corrupt_ids, metric=batch.metric(), attribute_to_layer_input=flags)
    expected = np.stack([np.stack([lib[i, p].double().numpy() for lib in library]) for i, p in enumerate(positions)])
    assert np.abs(expected).max() > 1e-3  # the corruption has an effect
    for method in (role_patching, layered_role_patching):
        got = method(model, batch, positions)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_layered_patching_leaves_no_hooks(setup):
    model, batch = setup

    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    before = hooks()
    layered_role_patching(model, batch, [[3], [5]])
    assert hooks() == before
