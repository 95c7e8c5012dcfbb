"""Tests for the IOI prompt generator, encoder and metric."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from captum_relp.tasks.ioi import (
    NAMES,
    IOIMetric,
    encode_ioi,
    generate_ioi_pairs,
    ioi_metric,
)


def _char_fallback_tokenizer(whole_words):
    """Word-level tokens for ``whole_words`` (with leading space), else single characters.

    Names not in ``whole_words`` are split into several character tokens.
    """
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,. "
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    # BPE without merges = character tokens; whole words are added tokens
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    tok.add_tokens([" " + w for w in whole_words])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def test_deterministic_and_seed_dependent():
    a = generate_ioi_pairs(20, seed=0)
    assert a == generate_ioi_pairs(20, seed=0)
    assert a != generate_ioi_pairs(20, seed=1)
    assert [p.template_id for p in a[:6]] == [0, 1, 2, 0, 1, 2]
    assert all(p.template_id == 2 for p in generate_ioi_pairs(5, templates=(2,)))


def test_swap_structure():
    for p in generate_ioi_pairs(30, seed=2):
        assert p.io_name != p.s_name
        assert p.clean_prompt.count(p.s_name) == 2 and p.clean_prompt.count(p.io_name) == 1
        assert p.corrupt_prompt.count(p.io_name) == 2 and p.corrupt_prompt.count(p.s_name) == 1
        cw, kw = p.clean_prompt.split(), p.corrupt_prompt.split()
        assert len(cw) == len(kw)
        for c, k in zip(cw, kw):
            c, k = c.strip(",."), k.strip(",.")
            if c == p.io_name:
                assert k == p.s_name
            elif c == p.s_name:
                assert k == p.io_name
            else:
                assert c == k
        assert p.clean_sentence.endswith(f" to {p.io_name}.")


def test_single_token_filter_and_alignment():
    keep = ["Mary", "John", "Tom"]
    other = ["the", "went", "to", "and", "gave", "a", "Then", "When", "After", "store"]
    tok = _char_fallback_tokenizer(keep + other)
    assert len(tok.encode(" Mary", add_special_tokens=False)) == 1
    assert len(tok.encode(" Susan", add_special_tokens=False)) > 1
    pairs = generate_ioi_pairs(12, seed=0, tokenizer=tok, names=["Mary", "John", "Susan", "Tom"])
    used = {p.io_name for p in pairs} | {p.s_name for p in pairs}
    assert used <= set(keep)
    batch = encode_ioi(pairs, tok)
    assert batch.clean_ids.shape == batch.corrupt_ids.shape
    name_ids = {tok.encode(" " + n, add_special_tokens=False)[0] for n in keep}
    for i, p in enumerate(pairs):
        diff = (batch.clean_ids[i] != batch.corrupt_ids[i]).nonzero().flatten().tolist()
        assert len(diff) == 3  # B, A, B positions
        assert set(batch.clean_ids[i, diff].tolist()) <= name_ids
        io, s = batch.io_ids[i].item(), batch.s_ids[i].item()
        assert batch.clean_ids[i, diff].tolist().count(s) == 2
        assert batch.corrupt_ids[i, diff].tolist().count(io) == 2
    with pytest.raises(ValueError, match="single-token"):
        generate_ioi_pairs(3, tokenizer=tok, names=["Susan", "Mary"])


def test_right_padding_and_last_pos():
    tok = _char_fallback_tokenizer(list(NAMES))
    pairs = generate_ioi_pairs(6, seed=0, tokenizer=tok)
    b = encode_ioi(pairs, tok)
    lens = [len(tok(p.clean_prompt)["input_ids"]) for p in pairs]
    assert b.last_pos.tolist() == [n - 1 for n in lens]
    assert b.attention_mask.sum(1).tolist() == lens
    pad = tok.pad_token_id
    for i, n in enumerate(lens):
        assert (b.clean_ids[i, n:] == pad).all() and (b.corrupt_ids[i, n:] == pad).all()
    assert "".join(b.positions) == pairs[0].clean_prompt
    assert len(b.to("cpu")) == 6


def test_metric_values_and_tiling():
    logits = torch.zeros(2, 3, 6)
    logits[0, 2, 4], logits[0, 2, 5] = 3.0, 1.0  # row 0: last_pos 2
    logits[1, 1, 4], logits[1, 1, 5] = -1.0, 1.0  # row 1: last_pos 1
    logits[1, 2, 4] = 100.0  # padding position must be ignored
    io, s, last = torch.tensor([4, 4]), torch.tensor([5, 5]), torch.tensor([2, 1])
    out = ioi_metric(logits, io, s, last)
    assert torch.allclose(out, torch.tensor([2.0, -2.0]))
    m = IOIMetric(io, s, last)
    tiled = torch.cat([logits, 2 * logits, 3 * logits])
    assert torch.allclose(m(tiled), torch.tensor([2.0, -2.0, 4.0, -4.0, 6.0, -6.0]))

    class Out:
        pass

    o = Out()
    o.logits = logits
    assert torch.allclose(m(o), out)
    with pytest.raises(ValueError):
        m(torch.zeros(3, 3, 6))
