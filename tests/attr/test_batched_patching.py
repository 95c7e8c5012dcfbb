"""The batched AP strategy skips the blocks under the patched ones (clean outputs reused)."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import build_model, token_pair

from captum_relp import LayerActivationPatching, logit_diff, model_components
from captum_relp.attr import _batched_patching
from captum_relp.models import find_blocks

FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_lower_blocks_give_the_plain_effects(family, monkeypatch):
    model = build_model(family, n_layers=3).double()
    clean, corrupt = token_pair(seq=4 if family == "gemma2" else 16)  # gemma2: within its sliding window of 8
    parts = model_components(model)
    layers, flags, _ = parts.select()
    skipped = []
    original = _batched_patching._skip_blocks
    monkeypatch.setattr(_batched_patching, "_skip_blocks",
                        lambda blocks, *a: skipped.append(len(blocks)) or original(blocks, *a))
    ap = LayerActivationPatching(model, layers)
    kwargs = dict(baselines=corrupt, attribute_to_layer_input=flags, metric=logit_diff([3, 4, 5], [6, 7, 8]),
                  internal_batch_size=8)
    fast = ap.attribute(clean, strategy="batched", **kwargs)
    assert max(skipped) == 2  # the top block's copies ran on the recorded output of block 1
    ref = ap.attribute(clean, strategy="plain", use_cache=False, **kwargs)
    assert any(r.abs().max() > 1e-6 for r in ref)
    assert all(torch.equal(f, r) for f, r in zip(fast, ref))
    assert all("forward" not in block.__dict__ for block in find_blocks(model))  # restored


def test_blocks_restored_when_a_run_fails():
    model = build_model("llama", n_layers=3)
    clean, corrupt = token_pair(seq=8)
    blocks = find_blocks(model)
    instance_forward = blocks[0].forward  # an instance attribute set by someone else is kept
    blocks[0].forward = instance_forward
    mlp = model_components(model).mlp[2]
    calls = []

    def fail(module, args, output):
        calls.append(output.shape[0])
        if output.shape[0] > clean.shape[0]:  # the first patched run (copies x B rows)
            raise RuntimeError("patched run failed")

    handle = mlp.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="patched run failed"):
            LayerActivationPatching(model, [mlp]).attribute(clean, baselines=corrupt, target=3, strategy="batched")
    finally:
        handle.remove()
    assert blocks[0].__dict__["forward"] is instance_forward
    assert all("forward" not in block.__dict__ for block in blocks[1:])
    del blocks[0].forward


def test_skip_needs_a_recorded_output():
    block = torch.nn.Linear(2, 2)
    assert _batched_patching._skip_blocks([block], None, 0) == []
    restore = _batched_patching._skip_blocks([block], (torch.ones(1, 3, 2), None), 1)
    out = block(torch.zeros(5, 2))
    assert out[0].shape == (1, 2, 2) and out[1] is None
    _batched_patching._restore_forwards(restore)
    assert "forward" not in block.__dict__ and block(torch.zeros(1, 2)).shape == (1, 2)
