"""Tests for the SVA prompt generator, encoder and metric."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from captum_relp.tasks.sva import (
    MAIN_VERBS,
    NOUNS,
    PREPOSITIONS,
    RC_VERBS,
    STRUCTURES,
    SVAMetric,
    encode_sva,
    generate_sva_pairs,
    split_nouns,
    sva_metric,
)


def _word_tokenizer(words):
    vocab = {"<unk>": 0, "<pad>": 1}
    for w in words:
        vocab.setdefault(" " + w, len(vocab))
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def _all_words(drop=()):
    words = {"The", "the", "that"} | set(PREPOSITIONS)
    for pairs in (NOUNS, RC_VERBS, MAIN_VERBS):
        for p in pairs:
            words |= set(p)
    return sorted(words - set(drop))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_deterministic_and_contrastive(structure):
    a = generate_sva_pairs(40, structure, seed=0)
    assert a == generate_sva_pairs(40, structure, seed=0)
    assert a != generate_sva_pairs(40, structure, seed=1)
    sg = {s for s, _ in NOUNS}
    pl = {p for _, p in NOUNS}
    for p in a:
        assert p.structure == structure
        cw, kw = p.clean_prompt.split(), p.corrupt_prompt.split()
        assert len(cw) == len(kw)
        diff = [i for i, (c, k) in enumerate(zip(cw, kw)) if c != k]
        assert len(diff) == 1
        i = diff[0]
        # the differing word is the agreeing noun, flipped in number
        assert (cw[i] in sg and kw[i] in pl) or (cw[i] in pl and kw[i] in sg)
        assert i == (4 if structure == "within_rc" else 1)
        correct_plural = cw[i] in pl
        verbs = RC_VERBS if structure == "within_rc" else MAIN_VERBS
        assert (p.correct_verb, p.wrong_verb) in [(v[int(correct_plural)], v[int(not
                correct_plural)]) for v in verbs]
    if structure == "across_rc":
        # the RC verb agrees with the RC noun, which is unchanged
        for p in a:
            w = p.clean_prompt.split()
            assert w[5] in [v[int(w[4] in pl)] for v in RC_VERBS]


def test_split_nouns_disjoint():
    train, held = split_nouns(0, 6)
    assert len(held) == 6 and len(train) == len(NOUNS) - 6
    assert set(train).isdisjoint(held)
    assert split_nouns(0, 6) == (train, held)
    assert split_nouns(1, 6)[1] != held
    pairs = generate_sva_pairs(30, "across_pp", seed=0, nouns=held)
    held_words = {w for p in held for w in p}
    assert all(p.clean_prompt.split()[1] in held_words for p in pairs)


def test_unknown_words_are_filtered():
    # a word-level tokenizer maps missing words to <unk>: one id, but not usable
    tok = _word_tokenizer(_all_words(drop=("athletes", "is")))
    assert tok.encode(" athletes", add_special_tokens=False) == [tok.unk_token_id]
    for s in STRUCTURES:
        pairs = generate_sva_pairs(40, s, seed=0, tokenizer=tok)
        text = " ".join(p.clean_prompt + " " + p.corrupt_prompt for p in pairs)
        assert "athlete" not in text
        assert all(p.correct_verb not in ("is", "are") for p in pairs)
        b = encode_sva(pairs, tok)
        assert (b.clean_ids != tok.unk_token_id).all()


def test_filter_with_splitting_tokenizer():
    # character fallback: words missing from the added tokens split into characters
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ "
    vocab = {"<unk>": 0, "<pad>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    tok.add_tokens([" " + w for w in _all_words(drop=("athletes", "is"))] + ["The"])
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    assert len(hf.encode(" athletes", add_special_tokens=False)) > 1
    for s in STRUCTURES:
        pairs = generate_sva_pairs(50, s, seed=0, tokenizer=hf)
        text = " ".join(p.clean_prompt + " " + p.corrupt_prompt for p in pairs)
        assert "athlete" not in text
        assert all(p.correct_verb not in ("is", "are") for p in pairs)
        b = encode_sva(pairs, hf)
        assert b.clean_ids.shape == b.corrupt_ids.shape
        assert ((b.clean_ids != b.corrupt_ids).sum(1) == 1).all()
        assert b.last_pos.tolist() == (b.attention_mask.sum(1) - 1).tolist()
        assert "".join(b.positions) == pairs[0].clean_prompt
        assert (b.correct_ids != b.wrong_ids).all()


def test_metric_values_and_tiling():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    logits = torch.zeros(2, 2, 3)
    logits[0, 1] = probs[0].log()
    logits[1, 0] = probs[1].log()
    logits[1, 1] = torch.tensor([0.0, 50.0, 0.0])  # beyond last_pos: ignored
    c, w, last = torch.tensor([1, 1]), torch.tensor([2, 0]), torch.tensor([1, 0])
    out = sva_metric(logits, c, w, last)
    assert torch.allclose(out, torch.tensor([0.3, -0.3]), atol=1e-6)
    m = SVAMetric(c, w, last)
    assert torch.allclose(m(torch.cat([logits, logits])), out.repeat(2), atol=1e-6)
    assert torch.allclose(m(logits[torch.arange(2), last]), out, atol=1e-6)
    with pytest.raises(ValueError):
        m(torch.zeros(3, 2, 3))
