"""Logits only where a plain metric reads them: never unchecked on a suffix run."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from captum_relp._plain_logits import plain_metric_logits
from captum_relp.metrics import MetricEvaluator


def _model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=16)).eval()


def test_probed_metric_on_a_suffix_run_gets_the_full_logits():
    model = _model()
    ids = torch.randint(11, (2, 5))
    seen = []
    evaluator = MetricEvaluator(2, None, lambda logits: seen.append(logits.shape) or logits[:, -1, 3])
    for offset, full in ((0, False), (2, True)):
        seen.clear()
        with torch.enable_grad(), plain_metric_logits(model, evaluator, model.lm_head, offset):
            logits = model(ids).logits
        assert (logits.shape[1] == 5) if full else (logits.shape[1] < 5 or torch.isnan(logits).any()), offset
        if full:
            torch.testing.assert_close(logits, model(ids).logits)
