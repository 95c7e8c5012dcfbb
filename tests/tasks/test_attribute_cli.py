"""``captum-relp attribute --task FILE`` on the shipped tiny model: a file the tests did not see, bad rows."""
import csv
import json

import numpy as np

from captum_relp.cli import main
from captum_relp.embedded import load_embedded
from captum_relp.tasks import generate_ioi_pairs

TEMPLATE = "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to"


def _eap_ig_csv(path, n=8):
    """EAP-IG's layout: clean, corrupted, correct_idx, incorrect_idx (ids of the tiny word-level tokenizer)."""
    _, tok = load_embedded("tiny-gpt2-ioi")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clean", "corrupted", "correct_idx", "incorrect_idx"])
        for i, pair in enumerate(generate_ioi_pairs(n, seed=41, templates=(2,), tokenizer=tok, places=["park", "beach"])):
            io = tok.encode(" " + pair.io_name, add_special_tokens=False)[0]
            s = tok.encode(" " + pair.s_name, add_special_tokens=False)[0]
            writer.writerow([pair.clean_prompt, pair.corrupt_prompt, io if i % 2 else json.dumps([io]), s])
    return path


def test_an_unseen_eap_ig_csv_runs_through_attribute(tmp_path, capsys):
    task = _eap_ig_csv(tmp_path / "my_task.csv")
    out = tmp_path / "out"
    code = main(["attribute", "--task", str(task), "--model", "tiny-gpt2-ioi", "--out", str(out), "--quiet",
                 "--rules", "relp,relp-ah", "--validate", "6"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "WARNING" not in printed.out and "may not solve" not in printed.err
    assert "answers given as ids" in printed.out and "bootstrap interval" in printed.out
    results = json.loads((out / "task_results.json").read_text())
    assert results["task"]["solves"] and results["task"]["clean_accuracy"] == 1.0 and not results["warnings"]
    assert results["config"]["validate"] == 6 and results["config"]["kind"] == "ids"
    row = results["agreement_with_ap"]["attn"]["RelP"]
    assert -1 <= row["interval"][0] <= row["pcc"] <= row["interval"][1] <= 1
    assert set(results["linearity"]["mlp"]) == {"AP", "AtP", "RelP", "RelP+AH"}
    scores = np.load(out / "task_scores.npz")
    assert scores["AP/mlp"].shape[0] == 6 and scores["RelP/mlp"].shape[0] == 8
    assert scores["valid"].shape == (8, scores["RelP/mlp"].shape[2])
    pairs = [json.loads(line) for line in (out / "task_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and pairs[0]["line"] == 2 and "correct_idx" in pairs[0]
    assert (out / "task_heatmap_mlp.png").stat().st_size > 1000


def test_a_bad_row_fails_with_its_line_and_nothing_is_written(tmp_path, capsys):
    task = _eap_ig_csv(tmp_path / "bad.csv", n=4)
    lines = task.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","  # line 4: incorrect_idx left empty
    task.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["attribute", "--task", str(task), "--model", "tiny-gpt2-ioi", "--out", str(out), "--quiet"])
    assert code == 3
    assert "bad.csv, line 4, field incorrect_idx: missing" in capsys.readouterr().err
    assert not out.exists()


def test_an_id_beyond_the_vocabulary_fails_after_loading_and_nothing_is_written(tmp_path, capsys):
    task = tmp_path / "ids.csv"
    task.write_text("clean,corrupted,correct_idx,incorrect_idx\nThen,When,6,7\nThen,When,123456,7\n")
    out = tmp_path / "out"
    assert main(["attribute", "--task", str(task), "--model", "tiny-gpt2-ioi", "--out", str(out), "--quiet"]) == 3
    assert "ids.csv, line 3, field correct_idx: token id 123456 is beyond the vocabulary" in capsys.readouterr().err
    assert not out.exists()


def test_circuit_and_edges_take_a_task_file(tmp_path, capsys):
    task = _eap_ig_csv(tmp_path / "my_task.csv", n=12)  # 6 pairs: the fewest with accuracy beyond chance
    assert main(["circuit", "--task", str(task), "--nodes", "components", "--n-train", "6", "--n-test", "6",
                 "--method", "relp,atp", "--out", str(tmp_path / "c"), "--quiet", "--no-plots"]) == 0
    circuit = json.loads((tmp_path / "c" / "circuit_results.json").read_text())
    assert circuit["task"]["solves"] and circuit["config"]["task"] == str(task)
    assert main(["edges", "--task", str(task), "--n-prompts", "6", "--n-eval", "6", "--method", "eap,relp",
                 "--no-exact", "--repeats", "1", "--out", str(tmp_path / "e"), "--quiet", "--no-plots"]) == 0
    edges = json.loads((tmp_path / "e" / "edges_results.json").read_text())
    assert edges["task"]["clean_accuracy"] == 1.0 and edges["meta"]["task"] == str(task)
    assert "task check on 6 pairs" in capsys.readouterr().out


def test_greater_than_layout_runs_through_attribute(tmp_path, digit_tokenizer, capsys):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(digit_tokenizer),
                                       n_positions=32))
    model.save_pretrained(tmp_path / "model")
    digit_tokenizer.save_pretrained(tmp_path / "model")
    task = tmp_path / "greater_than.csv"
    task.write_text("clean,corrupted,label\n" + "".join(
        f"The war lasted from the year 13{y:02d} to the year 13,The war lasted from the year 1301 to the year 13,{y}\n"
        for y in (52, 17, 80, 33, 64, 45)))
    code = main(["attribute", "--task", str(task), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"),
                 "--quiet", "--no-plots"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads((tmp_path / "o" / "task_results.json").read_text())
    assert results["config"]["metric"] == "prob-diff" and results["config"]["digits_teacher_forced"]
    assert results["warnings"] and "may not solve this task" in printed.err  # random weights
    assert len(results["task"]["clean_values"]) == 6 and "AP" in results["linearity"]["mlp"]


def test_attribute_task_ioi_is_the_ioi_experiment(tmp_path):
    out = tmp_path / "ioi"
    assert main(["attribute", "--task", "ioi", "--n-prompts", "2", "--methods", "atp,relp", "--out", str(out),
                 "--quiet", "--no-plots"]) == 0
    assert json.loads((out / "ioi_results.json").read_text())["config"]["n_prompts"] == 2


def test_circuit_refuses_a_file_whose_pairs_differ_in_layout_and_edges_takes_it(tmp_path, capsys):
    task = _eap_ig_csv(tmp_path / "mixed.csv", n=12)
    lines = task.read_text().splitlines()
    row = next(csv.reader([lines[4]]))  # line 5: one more word in both prompts
    row[0], row[1] = row[0].replace(" gave", " then gave"), row[1].replace(" gave", " then gave")
    with task.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for line in lines[:4]:
            writer.writerow(next(csv.reader([line])))
        writer.writerow(row)
        for line in lines[5:]:
            writer.writerow(next(csv.reader([line])))
    out = tmp_path / "c"
    assert main(["circuit", "--task", str(task), "--nodes", "components", "--n-train", "6", "--n-test", "6",
                 "--method", "relp", "--out", str(out), "--quiet", "--no-plots"]) == 3
    err = capsys.readouterr().err
    assert f"{task}, line 5: the clean prompt has 16 tokens and the corrupted 16, the first pair (line 2) 15" in err
    assert "one token layout" in err and not out.exists()
    # edge scores are summed over positions pair by pair: pairs of different lengths are fine there
    assert main(["edges", "--task", str(task), "--n-prompts", "6", "--n-eval", "6", "--method", "relp",
                 "--no-exact", "--repeats", "1", "--out", str(tmp_path / "e"), "--quiet", "--no-plots"]) == 0
