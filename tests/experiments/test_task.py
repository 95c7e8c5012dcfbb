"""run_task_experiment on a pair whose clean and corrupted prompts differ in length: AP equals
patching done by hand with forward hooks, under the alignment the task files document (the
shorter prompt shifted right so both end at one position, the pad tokens in front attended to,
one attention mask for both prompts)."""
import numpy as np
import pytest
import torch

from captum_relp.embedded import load_embedded
from captum_relp.experiments.task import run_task_experiment
from captum_relp.models import model_components
from captum_relp.tasks.file_encode import encode_task
from captum_relp.tasks.file_task import TaskFile, TaskPair

SHORT = "Then, John gave a ring to"
LONG = "Then, Anna and Tom went to the store. Anna gave a ring to"


def _hand_ap(model, kind: str, layer: int, clean, corrupt, mask, metric) -> np.ndarray:
    """``m(clean) - m(clean with the component at t taken from the corrupted run)``, one run per position."""
    parts = model_components(model)
    module = getattr(parts, kind)[layer]
    resid = kind == "resid"  # the residual stream entering the block: the block's input

    def value(output):
        return output[0] if isinstance(output, tuple) else output

    saved = {}

    def keep(mod, args, output=None):
        saved["x"] = (args[0] if resid else value(output)).detach().clone()

    handle = module.register_forward_pre_hook(keep) if resid else module.register_forward_hook(keep)
    with torch.no_grad():
        model(corrupt, attention_mask=mask)
    handle.remove()
    with torch.no_grad():
        base = metric(model(clean, attention_mask=mask).logits)
    effects = []
    for t in range(clean.shape[1]):
        def patch_input(mod, args, t=t):
            x = args[0].clone()
            x[:, t] = saved["x"][:, t]
            return (x,) + tuple(args[1:])

        def patch_output(mod, args, output, t=t):
            x = value(output).clone()
            x[:, t] = saved["x"][:, t]
            return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x

        handle = module.register_forward_pre_hook(patch_input) if resid else module.register_forward_hook(patch_output)
        try:
            with torch.no_grad():
                effects.append((base - metric(model(clean, attention_mask=mask).logits)).item())
        finally:
            handle.remove()
    return np.array(effects)


@pytest.mark.parametrize("longer", ["corrupted", "clean"])
def test_ap_on_prompts_of_different_lengths_is_patching_by_hand(longer):
    model, tok = load_embedded("tiny-gpt2-ioi")
    clean, corrupted = (SHORT, LONG) if longer == "corrupted" else (LONG, SHORT.replace("John", "Anna"))
    pair = TaskPair(clean, corrupted, answer=" Mary", foil=" John", line=2, source="pair.csv")
    task = TaskFile([pair], "strings", "pair.csv")
    batch = encode_task(task, tok)
    n_clean, n_corrupt = len(tok(clean)["input_ids"]), len(tok(corrupted)["input_ids"])
    width = max(n_clean, n_corrupt)
    assert n_clean != n_corrupt and batch.clean_ids.shape[1] == width
    assert int(batch.last_pos[0]) == width - 1 and batch.attention_mask.sum().item() == width  # pads attended
    shorter = batch.clean_ids if n_clean < n_corrupt else batch.corrupt_ids
    assert shorter[0, width - min(n_clean, n_corrupt):].tolist() == tok(min(clean, corrupted, key=len))["input_ids"]

    result = run_task_experiment(model, tok, task, show_progress=False, linearity=False)
    metric = batch.metric()
    checked = 0
    for kind in ("resid", "attn", "mlp"):
        for layer in (0, len(model_components(model).blocks) - 1):
            expected = _hand_ap(model, kind, layer, batch.clean_ids, batch.corrupt_ids, batch.attention_mask, metric)
            got = result.scores["AP"][kind][0, layer]
            assert np.abs(expected).max() > 1e-2  # the corruption matters here
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
            checked += 1
    assert checked == 6
