"""nnsight models/envoys and DDP/DataParallel wrappers are unwrapped wherever a model or layer is expected."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from captum_relp import LayerAttributionPatching, LayerRelevancePatching, model_components
from captum_relp.embedded import embedded_model_path
from captum_relp.integrations import unwrap_layers, unwrap_model

NAME = "tiny-gpt2-ioi"


@pytest.fixture(scope="module")
def setup():
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(NAME)).eval()
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    xc = torch.randint(0, model.config.vocab_size, (2, 6))
    blocks = list(model_components(model).blocks)
    expected = {r: LayerRelevancePatching(model, blocks, rules=r).attribute(x, baselines=xc, target=3)
                for r in ("relp", "relp-ah")}
    return model, x, xc, expected


class _StandIn:
    """nnsight's Envoy in the two respects that matter: not an nn.Module, the module in ``_module``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.ModuleList):
            return [_StandIn(m) for m in value]
        return _StandIn(value) if isinstance(value, torch.nn.Module) else value

    def __call__(self, *args, **kwargs):  # an nnsight model's call starts a trace, not a forward
        raise AssertionError("the wrapper itself must not be called")


def _wrapped_runs(model, wrapper, x, xc, expected):
    blocks = wrapper.transformer.h
    for rules, want in expected.items():
        got = LayerRelevancePatching(wrapper, list(blocks), rules=rules).attribute(x, baselines=xc, target=3)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), rules
    one = LayerRelevancePatching(wrapper, blocks[1]).attribute(x, baselines=xc, target=3)
    assert torch.is_tensor(one) and torch.equal(one, expected["relp"][1])
    atp = LayerAttributionPatching(wrapper, blocks[0]).attribute(x, baselines=xc, target=3)
    assert torch.equal(atp, LayerAttributionPatching(model, model.transformer.h[0]).attribute(
        x, baselines=xc, target=3))
    assert model_components(wrapper).blocks == list(model.transformer.h)


def test_stand_in_envoys(setup):
    model, x, xc, expected = setup
    _wrapped_runs(model, _StandIn(model), x, xc, expected)


def test_nnsight_language_model(setup):
    nnsight = pytest.importorskip("nnsight")
    model, x, xc, expected = setup
    lm = nnsight.LanguageModel(model, tokenizer=AutoTokenizer.from_pretrained(embedded_model_path(NAME)))
    assert unwrap_model(lm) is model and unwrap_model(lm.transformer.h[0]) is model.transformer.h[0]
    _wrapped_runs(model, lm, x, xc, expected)


def test_data_parallel_wrappers(setup, tmp_path):
    model, x, xc, expected = setup
    dp = torch.nn.DataParallel(model)
    got = LayerRelevancePatching(dp, list(dp.module.transformer.h), rules="relp-ah").attribute(
        x, baselines=xc, target=3)
    assert all(torch.equal(a, b) for a, b in zip(got, expected["relp-ah"]))
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model and unwrap_layers([ddp]) == [model]
        got = LayerRelevancePatching(ddp, list(model.transformer.h), rules="relp-ah").attribute(
            x, baselines=xc, target=3)
        assert all(torch.equal(a, b) for a, b in zip(got, expected["relp-ah"]))
    finally:
        torch.distributed.destroy_process_group()
