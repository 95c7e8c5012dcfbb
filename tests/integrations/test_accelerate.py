"""accelerate: dispatched and offloaded (CPU, disk) models give the scores of the plain model."""
from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM  # noqa: E402

from captum_relp import LayerAttributionPatching, LayerRelevancePatching, model_components  # noqa: E402
from captum_relp.embedded import embedded_model_path  # noqa: E402
from captum_relp.models import find_blocks  # noqa: E402

MODELS = ("tiny-gpt2-ioi", "tiny-llama-ioi")


def _load(name: str):
    return AutoModelForCausalLM.from_pretrained(embedded_model_path(name)).eval()


def _scores(model, rules, x, xc):
    blocks = list(model_components(model).blocks)
    if rules == "atp":
        return LayerAttributionPatching(model, blocks).attribute(x, baselines=xc, target=3)
    return LayerRelevancePatching(model, blocks, rules=rules).attribute(x, baselines=xc, target=3)


def _offload(model, how: str, folder):
    if how == "cpu":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "disk":
        return accelerate.disk_offload(model, str(folder), execution_device="cpu")
    # a device map mixing kept and disk-offloaded blocks
    blocks = find_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    device_map = {n: "cpu" for n, _ in model.named_children()}
    base = prefix.split(".")[0]
    del device_map[base]
    device_map.update({f"{base}.{n}": "cpu" for n, _ in model.get_submodule(base).named_children()
                       if f"{base}.{n}" != prefix})
    device_map.update({f"{prefix}.{i}": ("disk" if i % 2 else "cpu") for i in range(len(blocks))})
    return accelerate.dispatch_model(model, device_map, main_device="cpu", offload_dir=str(folder))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("how", ["cpu", "disk", "device_map"])
def test_offloaded_model_matches_plain(name, how, tmp_path):
    torch.manual_seed(0)
    plain = _load(name)
    vocab = plain.config.vocab_size
    x, xc = torch.randint(0, vocab, (2, 6)), torch.randint(0, vocab, (2, 6))
    expected = {r: _scores(plain, r, x, xc) for r in ("relp", "relp-ah", "atp")}
    model = _offload(_load(name), how, tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())
    model.lm_head.weight.requires_grad_(False)  # a mix of flags, restored as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for rules, want in expected.items():
        got = _scores(model, rules, x, xc)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # accelerate swaps Parameter objects in its hooks: flags are restored by name
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, rules
    assert not any("forward" in m.__dict__ and not hasattr(m, "_hf_hook") for m in model.modules())
