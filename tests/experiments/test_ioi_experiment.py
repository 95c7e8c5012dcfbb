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
    written = result.save(tmp_path)
    summary = json.loads((tmp_path / "ioi_results.json").read_text())
    check_pccs(result, summary)
    assert summary["config"]["model"] == saved_tiny_model.name  # a name, not the absolute path
    assert summary["layout"]["labels"] == summary["position_labels"] == result.position_labels
    assert {"S1", "IO", "S2", "END"} <= set(summary["layout"]["roles"])
    roles_of_first = [summary["layout"]["roles"][i] for i in summary["layout"]["position_role_index"][0] if i >= 0]
    assert roles_of_first[-1] == "END" and len(summary["mean_maps"]["AP"]["mlp"][0]) == len(result.position_labels)
    assert (tmp_path / "ioi_heatmap_mlp.png").stat().st_size > 1000 and len(written) == 6
    saved = np.load(tmp_path / "ioi_scores.npz")  # the published PCCs, recomputed from the saved scores
    keep = np.broadcast_to(saved["valid"][:, None, :], saved["AP/mlp"].shape)
    for kind, row in summary["pcc_per_prompt"].items():
        for method, value in row.items():
            recomputed = np.corrcoef(saved[f"{method}/{kind}"][keep], saved[f"AP/{kind}"][keep])[0, 1]
            assert abs(recomputed - value) < 1e-12 and abs(summary["agreement_with_ap"][kind][method]["pcc"] - value) < 1e-9
            low, high = summary["agreement_with_ap"][kind][method]["interval"]
            assert low <= value <= high
    assert "Residual stream" in result.format_table()


def _pcc(x, y):
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))


def check_pccs(result, summary):
    """Every PCC of the run and of its JSON, recomputed from the per-prompt scores (real positions
    only) and from the saved prompt-averaged maps, to 1e-12."""
    real = result.valid[:, None, :]
    checked = 0
    for kind in ("resid", "attn", "mlp"):
        reference = result.scores["AP"][kind]
        mask = np.broadcast_to(real, reference.shape)
        for method in result.scores:
            if method == "AP":
                continue
            per_prompt = _pcc(result.scores[method][kind][mask], reference[mask])
            mean_map = _pcc(summary["mean_maps"][method][kind], summary["mean_maps"]["AP"][kind])
            assert abs(per_prompt) > 0.05
            assert abs(result.pcc_per_prompt[kind][method] - per_prompt) < 1e-12, (kind, method)
            assert abs(summary["pcc_per_prompt"][kind][method] - per_prompt) < 1e-12, (kind, method)
            assert abs(summary["pcc_mean_map"][kind][method] - mean_map) < 1e-12, (kind, method)
            checked += 1
    assert checked == 3 * (len(result.scores) - 1)


def test_pearson_by_hand():
    x = np.array([1.0, 2.0, 4.0])
    y = np.array([1.0, 3.0, 2.0])
    xc, yc = x - x.mean(), y - y.mean()
    assert np.isclose(pearson(x, y), (xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))
    assert np.isnan(pearson(np.ones(3), y))


def test_calibration_is_calibrated_ioi_rules_with_the_given_default():
    """The run calibrates on the pairs of ``calibrated_ioi_rules`` (seed + 1, none of the evaluated ones):
    without a default its rules are that function's, value for value; with one, the file records it."""
    import warnings

    from captum_relp.calibration import calibrated_ioi_rules
    from captum_relp.embedded import load_embedded

    model, tokenizer = load_embedded("tiny-gpt2-ioi")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 pairs leave groups undecided
        runs = {default: run_ioi_experiment(model, tokenizer, n_prompts=2, rules=("calibrated",), seed=4,
                                            calibration_prompts=3, methods=("RelP",), show_progress=False,
                                            calibration_default=default).calibrated
                for default in (None, "gradient")}
        reference = calibrated_ioi_rules(model, tokenizer, n_prompts=3, seed=4,
                                         exclude=generate_ioi_pairs(2, seed=4, tokenizer=tokenizer))
    assert runs[None].info["calibration_pairs"] == reference.info["calibration_pairs"]
    assert runs[None].choices == reference.choices and runs[None].default == reference.default == "best-preset"
    assert runs[None].agreement == reference.agreement
    assert runs["gradient"].info["calibration_pairs"] == reference.info["calibration_pairs"]
    assert runs["gradient"].default == "gradient"
    assert all("'gradient'" in s["note"] for s in runs["gradient"].selection.values())
