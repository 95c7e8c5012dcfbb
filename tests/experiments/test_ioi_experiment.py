"""The IOI runner on a tiny model: AP entries equal a hand-patched forward; PCC and outputs."""
import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from captum_relp.experiments.ioi import pearson, run_ioi_experiment
from captum_relp.models import model_components
from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs


def test_runner_ap_matches_hand_patched_forward_and_writes_outputs(saved_tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_tiny_model)
    result = run_ioi_experiment(model, tokenizer, n_prompts=6, rules=("relp", "relp-ah"), batch_size=4,
                                seed=3, show_progress=False)
    assert set(result.scores) == {"AP", "AtP", "RelP", "RelP+AH"}
    pairs = generate_ioi_pairs(6, seed=3, tokenizer=tokenizer)
    batch = encode_ioi(pairs, tokenizer)
    example, layer, position = 5, 1, int(batch.last_pos[5]) - 2
    mlp = model_components(model).mlp[layer]
    mask = batch.attention_mask[example : example + 1]
    store = {}
    with torch.no_grad():
        handle = mlp.register_forward_hook(lambda m, a, o: store.__setitem__("corrupt", o.clone()))
        model(batch.corrupt_ids[example : example + 1], attention_mask=mask)
        handle.remove()

        def patch(m, a, o):
            o = o.clone()
            o[:, position] = store["corrupt"][:, position]
            return o

        def logit_diff(logits):
            last = logits[0, batch.last_pos[example]]
            return (last[batch.io_ids[example]] - last[batch.s_ids[example]]).item()

        clean = logit_diff(model(batch.clean_ids[example : example + 1], attention_mask=mask).logits)
        handle = mlp.register_forward_hook(patch)
        patched = logit_diff(model(batch.clean_ids[example : example + 1], attention_mask=mask).logits)
        handle.remove()
    assert result.scores["AP"]["mlp"][example, layer, position] == np.float32(clean - patched) or np.isclose(
        result.scores["AP"]["mlp"][example, layer, position], clean - patched, atol=1e-5)
    # padded positions are zero for every method
    pads = ~result.valid
    for by_kind in result.scores.values():
        for values in by_kind.values():
            assert np.all(values.transpose(0, 2, 1)[pads] == 0)
    assert 0.0 < result.pcc_per_prompt["mlp"]["AtP"] <= 1.0
    written = result.save(tmp_path)
    summary = json.loads((tmp_path / "ioi_results.json").read_text())
    assert summary["pcc_mean_map"]["resid"]["RelP"] == result.pcc_mean_map["resid"]["RelP"]
    assert summary["config"]["model"] == saved_tiny_model.name  # a name, not the absolute path
    assert summary["layout"]["labels"] == summary["position_labels"] == result.position_labels
    assert {"S1", "IO", "S2", "END"} <= set(summary["layout"]["roles"])
    roles_of_first = [summary["layout"]["roles"][i] for i in summary["layout"]["position_role_index"][0] if i >= 0]
    assert roles_of_first[-1] == "END" and len(summary["mean_maps"]["AP"]["mlp"][0]) == len(result.position_labels)
    assert (tmp_path / "ioi_heatmap_mlp.png").stat().st_size > 1000 and len(written) == 5
    assert "Residual stream" in result.format_table()


def test_pearson_by_hand():
    x = np.array([1.0, 2.0, 4.0])
    y = np.array([1.0, 3.0, 2.0])
    xc, yc = x - x.mean(), y - y.mean()
    assert np.isclose(pearson(x, y), (xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))
    assert np.isnan(pearson(np.ones(3), y))
