"""Every causal-LM and masked-LM model type transformers registers is in the family table or refused."""
import warnings

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from captum_relp import LayerRelevancePatching, UnsupportedModuleError, apply_rules
from captum_relp.families import FAMILY_TABLE, GUIDE
from tests.families.configs import TINY

MODEL_TYPES = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES))


class _Stub(torch.nn.Module):
    """A model carrying only the config of ``model_type`` (refusal reads the config)."""

    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.config.model_type = model_type
        self.proj = torch.nn.Linear(2, 2)


def test_every_registered_model_type_is_in_the_table_or_refused():
    assert set(FAMILY_TABLE) <= set(MODEL_TYPES), "table entries must be real model types"
    refused = []
    for model_type in MODEL_TYPES:
        if model_type in FAMILY_TABLE:
            assert model_type in TINY  # then the four checks of test_families run on it
            continue
        with pytest.raises(UnsupportedModuleError) as error:
            with apply_rules(_Stub(model_type), "relp"):
                pass
        assert repr(model_type) in str(error.value) and GUIDE in str(error.value)
        refused.append(model_type)
    assert len(refused) == len(MODEL_TYPES) - len(FAMILY_TABLE)


def _tiny(config_cls, model_cls, **fields):
    torch.manual_seed(0)
    config = config_cls(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=32, **fields)
    return model_cls(config).eval()


@pytest.mark.parametrize("name", ["mixtral", "granite", "cohere"])
def test_real_models_outside_the_table_are_refused(name):
    model = {
        "mixtral": lambda: _tiny(transformers.MixtralConfig, transformers.MixtralForCausalLM,
                                 num_local_experts=2, num_experts_per_tok=1),
        "granite": lambda: _tiny(transformers.GraniteConfig, transformers.GraniteForCausalLM),
        "cohere": lambda: _tiny(transformers.CohereConfig, transformers.CohereForCausalLM),
    }[name]()
    ids = torch.randint(32, (1, 5))
    relp = LayerRelevancePatching(model, model.model.layers[0])
    with pytest.raises(UnsupportedModuleError, match=f"model type '{name}'.*{GUIDE}"):
        relp.attribute(ids, target=3)
    with warnings.catch_warnings(record=True) as caught:  # strict=False: a warning, scores at own risk
        warnings.simplefilter("always")
        LayerRelevancePatching(model, model.model.layers[0], strict=False).attribute(ids, target=3)
    assert any(name in str(w.message) for w in caught)
