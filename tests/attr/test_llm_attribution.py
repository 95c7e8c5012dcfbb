"""LayerRelevancePatching inside Captum's LLMGradientAttribution."""
import torch
from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput
from tests.conftest import VOCAB, build_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from captum_relp import LayerRelevancePatching


def _tokenizer():
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def test_llm_gradient_attribution_accepts_relp_and_matches_captum_without_rules():
    model = build_model("gpt2")
    tokenizer = _tokenizer()
    layer = model.transformer.h[1]
    prompt, target = "w3 w7 w11 w4", "w9 w2"

    def run(method):
        llm_attr = LLMGradientAttribution(method, tokenizer)
        return llm_attr.attribute(TextTokenInput(prompt, tokenizer), target=target)

    reference = run(LayerGradientXActivation(model, layer))
    no_rules = run(LayerRelevancePatching(model, layer, rules="none"))
    relp = run(LayerRelevancePatching(model, layer, rules="relp"))
    assert relp.token_attr.shape == reference.token_attr.shape == (2, 4)
    torch.testing.assert_close(no_rules.token_attr, reference.token_attr)
    assert not torch.allclose(relp.token_attr, reference.token_attr)
    assert torch.isfinite(relp.seq_attr).all()
