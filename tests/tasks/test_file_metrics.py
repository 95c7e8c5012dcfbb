"""Task-file metrics checked by hand-computed values, through the attribution classes too."""
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from captum_relp.attr import METHODS
from captum_relp.embedded import load_embedded
from captum_relp.models import model_components
from captum_relp.tasks.file_encode import encode_task
from captum_relp.tasks.file_metrics import AnswerLogProb, SetLogitDiff, SetProbDiff, linearized, padded
from captum_relp.tasks.file_task import TaskPair

PROMPT = "The war lasted from the year 13{} to the year 13"


def _greater_than_batch(tok):
    return tok, encode_task([TaskPair(PROMPT.format(52), PROMPT.format("01"), label=52)], tok)


def test_greater_than_metric_by_hand_on_tiny_logits(digit_tokenizer):
    tok, batch = _greater_than_batch(digit_tokenizer)
    torch.manual_seed(0)
    logits = torch.randn(1, batch.clean_ids.shape[1], len(tok))
    last = int(batch.last_pos[0])
    p0, p1 = torch.softmax(logits[0, last], -1).tolist(), torch.softmax(logits[0, last + 1], -1).tolist()
    digit = {d: tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    above = below = 0.0
    for year in range(100):  # P(year) = P(d1) P(d2 | d1) for the label's tens digit, else counted by P(d1)
        tens, units = divmod(year, 10)
        p = p0[digit[tens]] * (p1[digit[units]] if tens == 5 else 0.1)
        if year > 52:
            above += p
        else:
            below += p
    assert math.isclose(float(batch.metric()(logits)), above - below, rel_tol=1e-5)


def test_single_token_years_prob_diff_and_logit_diff_by_hand():
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.15, 0.25]]]))
    years_above, years_below = padded([[3, 4]]), padded([[0, 1, 2]])
    assert math.isclose(float(SetProbDiff(years_above, years_below, torch.tensor([0]))(logits)),
                        (0.15 + 0.25) - (0.1 + 0.2 + 0.3), rel_tol=1e-5)
    z = logits[0, 0].tolist()
    assert math.isclose(float(SetLogitDiff(years_above, years_below, torch.tensor([0]))(logits)),
                        (z[3] + z[4]) / 2 - (z[0] + z[1] + z[2]) / 3, rel_tol=1e-5)


def test_sequence_logprob_is_teacher_forced_by_hand():
    z = torch.randn(2, 4, 6)
    metric = AnswerLogProb(padded([[1], [2]]), padded([[3, 5], [4, -1]]), torch.tensor([0, 1]))
    logp = torch.log_softmax(z, -1)
    expected = [logp[0, 0, 1] + logp[0, 1, 3] + logp[0, 2, 5], logp[1, 1, 2] + logp[1, 2, 4]]
    assert torch.allclose(metric(z), torch.stack(expected))
    # four tiled copies (activation patching): the same values repeated
    assert torch.allclose(metric(z.repeat(4, 1, 1)), torch.stack(expected).repeat(4))


def test_linearized_metric_is_the_first_order_expansion():
    z0 = torch.randn(1, 2, 5)
    metric = SetProbDiff(padded([[1]]), padded([[2, 3]]), torch.tensor([1]))
    lin = linearized(metric, z0)
    z = z0 + 0.3 * torch.randn_like(z0)
    leaf = z0[0, 1].clone().requires_grad_(True)
    probs = torch.softmax(leaf, -1)
    (probs[1] - probs[2] - probs[3]).backward()
    expected = metric(z0) + (leaf.grad * (z[0, 1] - z0[0, 1])).sum()
    assert torch.allclose(lin(z), expected, atol=1e-6)
    assert torch.allclose(lin(z0), metric(z0))


def test_declared_positions_give_the_full_logits_scores():
    model, tok = load_embedded()
    pair = TaskPair("Then, Mary and John went to the store. John gave a ring to",
                    "Then, John and Mary went to the store. Mary gave a ring to", answer="Mary", foil="John")
    batch = encode_task([pair, pair], tok)
    layers, flags, _ = model_components(model).select(["mlp"])
    kwargs = dict(baselines=batch.corrupt_ids, additional_forward_args={"attention_mask": batch.attention_mask},
                  attribute_to_layer_input=flags, reduce="sum")
    metric = batch.metric()
    assert metric.reads_final_logits
    fast = METHODS["AtP"].attribute(model, layers, batch.clean_ids, metric=metric, **kwargs)
    full = METHODS["AtP"].attribute(model, layers, batch.clean_ids, metric=lambda z: metric(z[:, :, :] + 0), **kwargs)
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, atol=1e-5)


def test_activation_patching_through_the_two_step_metric_by_hand(digit_tokenizer):
    tok, batch = _greater_than_batch(digit_tokenizer)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=32)).eval()
    mlp = model_components(model).mlp[0]
    metric = batch.metric()
    scores = METHODS["AP"].attribute(model, [mlp], batch.clean_ids, baselines=batch.corrupt_ids, metric=metric,
                                     additional_forward_args={"attention_mask": batch.attention_mask},
                                     show_progress=False)[0]
    position = int(batch.last_pos[0])  # the last prompt token: read by both steps
    store = {}
    with torch.no_grad():
        handle = mlp.register_forward_hook(lambda m, a, o: store.__setitem__("corrupt", o.clone()))
        model(batch.corrupt_ids, attention_mask=batch.attention_mask)
        handle.remove()

        def patch(m, a, o):
            o = o.clone()
            o[:, position] = store["corrupt"][:, position]
            return o

        clean = metric(model(batch.clean_ids, attention_mask=batch.attention_mask).logits)
        handle = mlp.register_forward_hook(patch)
        patched = metric(model(batch.clean_ids, attention_mask=batch.attention_mask).logits)
        handle.remove()
    assert math.isclose(float(scores[0, position]), float(clean - patched), rel_tol=1e-4, abs_tol=1e-7)
