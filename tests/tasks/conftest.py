"""A word-level tokenizer that splits numbers into digits, for the greater-than tests."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def digit_tokenizer():
    """Word-level, numbers split into single digits (as SmolLM2 and Llama tokenizers do)."""
    words = ["<unk>", "<pad>", "The", "war", "lasted", "from", "the", "year", "to"] + [str(d) for d in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
