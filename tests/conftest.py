"""Tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from captum_relp.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES

VOCAB = 64

FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "bert")


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh temporary folder: nothing it writes lands in the working folder,
    and nothing already there (such as the quick start's ``relp-out/``) changes its outcome."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def build_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, n_layers: int = 2):
    """A 2-layer random model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, **common)
        cls = transformers.GPT2LMHeadModel
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=32,
                                            bos_token_id=0, eos_token_id=0, **common)
        cls = transformers.GPTNeoXForCausalLM
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64,
                                          max_position_embeddings=32, **common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64,
                                          max_position_embeddings=32, **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "gemma2":
        config = transformers.Gemma2Config(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                           max_position_embeddings=32, sliding_window=8,
                                           query_pre_attn_scalar=8, **common)
        cls = transformers.Gemma2ForCausalLM
    elif family == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32, **common)
        cls = transformers.BertForMaskedLM
    else:
        raise ValueError(family)
    if family == "gemma2" and attn_implementation == "sdpa":
        attn_implementation = "eager"  # Gemma2 soft-caps attention scores: transformers refuses sdpa
    config._attn_implementation = attn_implementation
    model = cls(config)
    if family == "gemma2":  # Gemma's RMSNorm weight starts at 0: make the 1 + w offset matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.3)
    return model.eval()


def token_pair(batch: int = 3, seq: int = 7, seed: int = 1, n_diff: int = 2):
    """Clean and corrupt token ids differing at ``n_diff`` positions."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    corrupt = clean.clone()
    positions = torch.randperm(seq - 1, generator=generator)[:n_diff]
    corrupt[:, positions] = torch.randint(1, VOCAB, (batch, n_diff), generator=generator)
    return clean, corrupt


def model_state(model: torch.nn.Module):
    """Everything attribution must leave untouched."""
    return {
        "forward_patches": [n for n, m in model.named_modules() if "forward" in m.__dict__],
        "hooks": [
            n for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
        ],
        "grad_flags": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
    }


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# --- IOI: a tiny random GPT-2 with a word-level tokenizer covering the IOI vocabulary ---


def ioi_tokenizer(drop_names=False):
    words = {"<unk>", "<pad>", "Then", "When", "After", "and", "went", "to", "the", "gave", "a", ",", "."}
    words |= set(PLACES) | set(OBJECTS)
    words |= {w for t in TEMPLATES for w in t.replace(",", " ").replace(".", " ").split() if "[" not in w}
    if not drop_names:
        words |= set(NAMES)
    else:  # names split into characters: no name is a single token
        words |= {c for name in NAMES for c in name}
    vocab = {w: i for i, w in enumerate(sorted(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    split = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    if drop_names:
        split.append(pre_tokenizers.Split("", "isolated"))
    core.pre_tokenizer = pre_tokenizers.Sequence(split)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")


def tiny_lm(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=48, vocab_size=vocab_size,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ioi")
    tokenizer = ioi_tokenizer()
    tiny_lm(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
