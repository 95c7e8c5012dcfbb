"""Task files: layouts, bad rows named by file, line and field, answers checked against the tokenizer."""
import json

import pytest
import torch

from captum_relp.embedded import load_embedded
from captum_relp.tasks.file_encode import describe_answers, encode_task
from captum_relp.tasks.file_task import load_task_file, save_pairs


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_embedded("tiny-gpt2-ioi")[1]


def test_eap_ig_csv_layout_with_int_and_list_ids(tmp_path):
    path = tmp_path / "eap.csv"
    path.write_text('clean,corrupted,correct_idx,incorrect_idx\n'
                    '"x, y",z,12,"[3, 4]"\n'
                    'a,"b\nc",[7],9\n'
                    'd,e,1,2\n')
    task = load_task_file(path)
    assert task.kind == "ids"
    assert [(p.correct_ids, p.incorrect_ids, p.line) for p in task.pairs] == [
        ((12,), (3, 4), 2), ((7,), (9,), 3), ((1,), (2,), 5)]  # the quoted newline spans lines 3-4
    assert task.pairs[0].clean == "x, y"


@pytest.mark.parametrize("text, message", [
    ("clean,corrupted,correct_idx\na,b,3\n", "line 2, field incorrect_idx: missing"),
    ("clean,corrupted,correct_idx,incorrect_idx\na,b,1,2\n ,b,1,2\n", "line 3, field clean: empty"),
    ("clean,corrupted,correct_idx,incorrect_idx\na,b,1,2\na,b,x,2\n", "line 3, field correct_idx: expected a token id"),
    ("clean,corrupted,label\na,b,52\na,b,152\n", "line 3, field label: expected the start year"),
    ("clean,label\na,5\n", "line 2, field corrupted: missing"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_task_file(path)
    assert str(error.value).startswith(str(path))


def test_unreadable_and_jsonl_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_task_file(tmp_path / "missing.jsonl")
    path = tmp_path / "t.jsonl"
    path.write_text('{"clean": "a", "corrupted": "b", "answer": " x", "foil": " y"}\n\n{"clean": "a"\n')
    with pytest.raises(ValueError, match=r"t.jsonl, line 3: not a JSON object"):
        load_task_file(path)


def test_id_beyond_vocabulary_names_the_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "ids.csv"
    path.write_text("clean,corrupted,correct_idx,incorrect_idx\nThen,When,6,7\nThen,When,6,\"[7, 99999]\"\n")
    with pytest.raises(ValueError, match=r"ids.csv, line 3, field incorrect_idx: token id 99999 is beyond"):
        encode_task(load_task_file(path), tiny_tokenizer)


def test_strings_must_agree_with_ids_and_be_one_token(tiny_tokenizer, tmp_path):
    mary = tiny_tokenizer.encode(" Mary", add_special_tokens=False)[0]
    rows = [{"clean": "Then, John and Mary went to the store. John gave a ring to",
             "corrupted": "Then, Mary and John went to the store. Mary gave a ring to",
             "answer": "Mary", "foil": "John", "correct_idx": mary + 1, "incorrect_idx": 7}]
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="line 1, field answer: 'Mary' encodes to .* but correct_idx gives"):
        encode_task(load_task_file(path), tiny_tokenizer)
    rows[0].update(answer="Mary Mary")
    rows[0].pop("correct_idx"), rows[0].pop("incorrect_idx")
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="line 1, field answer: 'Mary Mary' is 2 tokens"):
        encode_task(load_task_file(path), tiny_tokenizer)
    path.write_text(json.dumps(rows[0]) + "\n")
    batch = encode_task(load_task_file(path), tiny_tokenizer, "logprob")  # a sequence: teacher-forced
    assert batch.rest.tolist() == [[mary]] and batch.clean_ids[0, int(batch.last_pos[0]) + 1] == mary


def test_different_lengths_align_at_the_last_prompt_token(tiny_tokenizer):
    from captum_relp.tasks.file_task import TaskPair

    pair = TaskPair("Then, Mary and John went to the store. John gave a ring to",
                    "John gave a ring to", answer="Mary", foil="John")
    batch = encode_task([pair], tiny_tokenizer)
    last = int(batch.last_pos[0])
    assert batch.clean_ids[0, last] == batch.corrupt_ids[0, last]  # both end with " to" at one position
    short = tiny_tokenizer("John gave a ring to")["input_ids"]
    assert batch.corrupt_ids[0, last + 1 - len(short): last + 1].tolist() == short
    assert int(batch.attention_mask.sum()) == last + 1


def test_greater_than_digits_are_teacher_forced(tmp_path, digit_tokenizer):
    path = tmp_path / "gt.csv"
    path.write_text("clean,corrupted,label\nThe war lasted from the year 1352 to the year 13,"
                    "The war lasted from the year 1301 to the year 13,52\n")
    tok = digit_tokenizer
    batch = encode_task(load_task_file(path), tok)
    assert batch.metric_name == "prob-diff" and batch.digit_ids == tuple(tok.convert_tokens_to_ids(list("0123456789")))
    last = int(batch.last_pos[0])
    assert tok.convert_ids_to_tokens(batch.clean_ids[0, last - 1: last + 2].tolist()) == ["1", "3", "5"]
    assert batch.corrupt_ids[0, last + 1] == tok.convert_tokens_to_ids("5")


def test_saved_pairs_load_again_and_ids_are_decoded(tmp_path, tiny_tokenizer):
    path = tmp_path / "ids.csv"
    path.write_text("clean,corrupted,correct_idx,incorrect_idx\nThen,When,6,\"[7, 8]\"\n")
    task = load_task_file(path)
    again = load_task_file(save_pairs(task.pairs, tmp_path / "again.jsonl"))
    assert again.pairs[0].correct_ids == (6,) and again.pairs[0].incorrect_ids == (7, 8)
    assert describe_answers(task, tiny_tokenizer) == [
        "line 2: correct_idx [6] -> [' Adam'], incorrect_idx [7, 8] -> [' After', ' Alex']"]


def test_shipped_examples_are_what_the_generator_writes(tmp_path):
    from captum_relp.tasks.examples import EXAMPLES, example_path, write_examples

    for written in write_examples(tmp_path):
        name = next(k for k, v in EXAMPLES.items() if v == written.name)
        assert written.read_text() == example_path(name).read_text(), name
    assert load_task_file(example_path("capitals")).kind == "strings"
    assert len(load_task_file(example_path("greater_than"))) == 32
