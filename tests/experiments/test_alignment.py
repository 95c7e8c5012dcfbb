"""Prompt-averaged IOI maps average token roles, never positions of different templates."""
import json

import numpy as np
import pytest

from captum_relp.embedded import load_embedded
from captum_relp.experiments.alignment import RoleLayout
from captum_relp.experiments.ioi import IOIExperimentResult
from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs, ioi_token_roles


@pytest.fixture(scope="module")
def tokenizer():
    return load_embedded("tiny-gpt2-ioi")[1]


def _result(pairs, tokenizer):
    """Scores that are 1 at each prompt's S2 token (layer 0), 2 at its IO token (layer 1), else 0."""
    batch = encode_ioi(pairs, tokenizer)
    roles = [ioi_token_roles(p, tokenizer) for p in pairs]
    tokens = [[tokenizer.decode([t]) for t in ids[: len(r)]] for ids, r in zip(batch.clean_ids.tolist(), roles)]
    scores = np.zeros((len(pairs), 2, batch.clean_ids.shape[1]))
    for row, row_roles in enumerate(roles):
        scores[row, 0, row_roles.index("S2")] = 1.0
        scores[row, 1, row_roles.index("IO")] = 2.0
    valid = batch.attention_mask.bool().numpy()
    result = IOIExperimentResult({"AP": {"mlp": scores}}, valid, {}, {}, {}, {"n_prompts": len(pairs), "model": "m"},
                                 layout=RoleLayout.from_roles(roles, tokens))
    return result, roles


def test_templates_of_different_lengths_average_by_role(tokenizer):
    pairs = generate_ioi_pairs(6, seed=0, tokenizer=tokenizer)  # templates 0, 1, 2, 0, 1, 2
    assert {len(ioi_token_roles(p, tokenizer)) for p in pairs} == {15, 16}
    result, roles = _result(pairs, tokenizer)
    labels = result.position_labels
    mean = result.mean_maps()["AP"]["mlp"]
    expected = np.zeros_like(mean)
    expected[0, labels.index("S2")] = 1.0
    expected[1, labels.index("IO")] = 2.0
    np.testing.assert_allclose(mean, expected)  # position-wise averaging would give 1/3 and 2/3 splits
    naive = result.scores["AP"]["mlp"].sum(0) / result.valid.sum(0)
    assert naive[0].max() == pytest.approx(4 / 6)  # what averaging positions would show
    assert labels[:3] == ["<bos>", "Then/When/After", ","]
    assert {"S1", "IO", "S2", "END", "./,"} <= set(labels)
    assert result.layout.counts()[labels.index(",")] == 4  # the comma after Then/When only
    assert all(result.layout.counts()[labels.index(r)] == 6 for r in ("S1", "IO", "S2", "END"))


def test_role_of_each_name_token_is_its_part_in_the_sentence(tokenizer):
    for pair in generate_ioi_pairs(3, seed=4, tokenizer=tokenizer):
        ids = tokenizer(pair.clean_prompt)["input_ids"]
        roles = ioi_token_roles(pair, tokenizer)
        text = [tokenizer.decode([t]).strip() for t in ids]
        assert text[roles.index("S1")] == text[roles.index("S2")] == pair.s_name
        assert text[roles.index("IO")] == pair.io_name
        assert text[roles.index("PLACE")] == pair.place and text[roles.index("OBJECT")] == pair.obj
        assert roles[-1] == "END" and text[-1] == "to"


def test_layout_is_recorded_and_inconsistent_roles_are_refused(tokenizer):
    result, roles = _result(generate_ioi_pairs(3, seed=1, tokenizer=tokenizer), tokenizer)
    saved = result.layout.to_json()
    assert saved["roles"][saved["labels"].index("S2")] == "S2"
    assert saved["position_role_index"][2][roles[2].index("END")] == saved["roles"].index("END")
    with pytest.raises(ValueError, match="repeats"):
        RoleLayout.from_roles([["a", "a"]], [["x", "y"]])
    with pytest.raises(ValueError, match="order"):
        RoleLayout.from_roles([["A", "B"], ["B", "A"]], [["x", "y"], ["y", "x"]])
    assert json.dumps(saved)
