"""The task check: quiet on the shipped IOI model, fires on random weights and on ids for another tokenizer."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from captum_relp.embedded import load_embedded
from captum_relp.tasks import generate_ioi_pairs
from captum_relp.tasks.competence import Competence, binomial_p_value, competence_check
from captum_relp.tasks.file_encode import encode_task
from captum_relp.tasks.file_task import TaskPair


@pytest.fixture(scope="module")
def shipped():
    return load_embedded("tiny-gpt2-ioi")


@pytest.fixture(scope="module")
def ioi_pairs(shipped):
    _, tok = shipped
    return [TaskPair(p.clean_prompt, p.corrupt_prompt, answer=p.io_name, foil=p.s_name, line=i + 2)
            for i, p in enumerate(generate_ioi_pairs(24, seed=7, tokenizer=tok))]


def test_quiet_on_the_shipped_ioi_model(shipped, ioi_pairs):
    model, tok = shipped
    check = competence_check(model, encode_task(ioi_pairs, tok))
    assert check.solves and not check.warnings
    assert check.clean_accuracy == 1.0 and check.clean_mean > 0 > check.corrupted_mean
    assert check.effect_size > 1.0


def test_fires_on_a_random_weight_model(shipped, ioi_pairs):
    model, tok = shipped
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    check = competence_check(random_model, encode_task(ioi_pairs, tok))
    assert not check.solves and check.warnings
    assert "WARNING: the model may not solve this task" in check.summary()


def test_fires_on_ids_written_for_another_tokenizer(shipped, ioi_pairs):
    model, tok = shipped
    rng = random.Random(0)  # ids in range that mean other tokens here
    foreign = [TaskPair(p.clean, p.corrupted, correct_ids=(rng.randrange(len(tok)),),
                        incorrect_ids=(rng.randrange(len(tok)),)) for p in ioi_pairs]
    check = competence_check(model, encode_task(foreign, tok))
    assert not check.solves and any("accuracy" in w for w in check.warnings)


def test_values_by_hand():
    clean, corrupted = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0]), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    check = Competence.from_values(clean, corrupted, torch.tensor([True, True, True, False, True]))
    diff = clean - corrupted
    assert check.clean_mean == pytest.approx(2.6) and check.corrupted_mean == pytest.approx(0.8)
    assert check.clean_accuracy == 0.8 and check.accuracy_p_value == pytest.approx(6 / 32)
    assert check.effect_size == pytest.approx(float(diff.mean() / diff.std()))
    assert binomial_p_value(5, 5) == pytest.approx(1 / 32)
