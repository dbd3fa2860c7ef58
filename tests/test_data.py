"""Task loaders, templates, batching and bad-data errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jpeft import data


@pytest.fixture(scope="module")
def tok():
    return data.default_tokenizer()


EXPECTED = {
    "boolq": (
        "Text: Water is a liquid that makes things wet when it touches them.\n\n"
        "Answer the following yes/no question: is water wet? Yes or no?",
        ("No", "Yes"), 1,
    ),
    "piqa": (
        "Goal: To keep bread fresh longer,\n\nWhich is the correct ending?\n- store it in a sealed bag.\n"
        "- leave it open on the counter.\n\nAnswer:",
        ("store it in a sealed bag.", "leave it open on the counter."), 0,
    ),
    "siqa": (
        "Context: Alex forgot his lunch at home.\nQuestion: How would Alex feel?\n"
        "Which one of these answers best answers the question according to the context?\nA: hungry\nB: sleepy\nC: proud",
        ("A", "B", "C"), 0,
    ),
    "winogrande": (
        "The trophy did not fit in the suitcase because the _ was too big.\n"
        "What does the _ in the above sentence refer to? trophy or suitcase?",
        ("trophy", "suitcase"), 0,
    ),
    "arc_easy": (
        "Pick the most correct option to answer the following question.\n\nWhich of these is a source of light?\n\n"
        "Options:\n- A: a rock\n- B: the Sun\n- C: a shadow\n- D: a mirror",
        ("A", "B", "C", "D"), 1,
    ),
    "arc_challenge": (
        "Which of these is a source of light?\n\nOptions:\n- a rock\n- the Sun\n- a shadow\n- a mirror",
        ("a rock", "the Sun", "a shadow", "a mirror"), 1,
    ),
    "obqa": (
        "A magnet will stick to\n\nWhich is the correct answer?\n- a wooden spoon\n- an iron nail\n- a glass cup\n- a paper towel",
        ("a wooden spoon", "an iron nail", "a glass cup", "a paper towel"), 1,
    ),
}


@pytest.mark.parametrize("task", data.TASKS)
def test_tasks_render_thesis_templates(task):
    train = data.load_task(task, "train", path=data.sample_path(task, "train"))
    validation = data.load_task(task, "validation", path=data.sample_path(task, "validation"))
    assert len(train) == 12 and len(validation) == 6
    prompt, choices, label = EXPECTED[task]
    assert (train[0].prompt, train[0].choices, train[0].label) == (prompt, choices, label)
    assert train[0].source.endswith("train.jsonl:0") and train[0].task == task
    assert all(0 <= ex.label < len(ex.choices) for ex in train + validation)


def test_llm_adapters_format():
    pairs = data.load_instructions(data.ASSETS / "sample_data" / "commonsense_mini.json")
    assert len(pairs) == 36
    assert pairs[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nPlease answer the following question with true or false, question: is water wet?\n\n"
        "Answer format: true/false\n\n### Response:\n",
        "the correct answer is true",
    )


def test_json_and_parquet_files(tmp_path):
    records = [json.loads(line) for line in open(data.sample_path("piqa", "train"))]
    (tmp_path / "a.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    expected = data.load_task("piqa", "train", path=data.sample_path("piqa", "train"))
    for name in ("a.json", "a.parquet"):
        loaded = data.load_task("piqa", "train", path=tmp_path / name)
        assert [(e.prompt, e.choices, e.label) for e in loaded] == [(e.prompt, e.choices, e.label) for e in expected]
    with pytest.raises(ValueError, match="unknown task 'hellaswag'"):
        data.load_task("hellaswag", path=tmp_path / "a.json")


@pytest.mark.parametrize(
    "task,record,message",
    [
        ("piqa", {"goal": "g", "sol1": "a", "label": 0}, r"bad.jsonl:1: missing field 'sol2'"),
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, r"bad.jsonl:1: field 'label' = 2 is out of range for 2 choices"),
        ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "4"}, r"bad.jsonl:1: field 'label' = '4' is out of range"),
        ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, r"bad.jsonl:1: field 'sentence' has no '_' blank"),
        ("arc_easy", {"question": "q", "choices": {"text": [], "label": []}, "answerKey": "A"}, r"bad.jsonl:1: field 'choices' has no choices"),
        ("obqa", {"question_stem": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "E"}, r"bad.jsonl:1: field 'answerKey' = 'E' is not one of the choice labels"),
        ("boolq", {"question": "q", "passage": "p", "answer": "maybe"}, r"bad.jsonl:1: field 'answer' = 'maybe' is not a bool"),
    ],
)
def test_bad_records_name_file_and_record(tmp_path, task, record, message):
    good = json.loads(open(data.sample_path(task, "train")).readline())
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(data.DataError, match=message):
        data.load_task(task, path=path)


def test_empty_file_and_bad_instruction(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="empty.jsonl: the file holds no records"):
        data.load_task("boolq", path=tmp_path / "empty.jsonl")
    (tmp_path / "inst.json").write_text(json.dumps([{"instruction": "x", "input": "", "answer": "a"}]))
    with pytest.raises(data.DataError, match=r"inst.json:0: missing field 'output'"):
        data.load_instructions(tmp_path / "inst.json")


def test_training_batches_mask_answers_and_resume(tok):
    examples = data.load_task("obqa", "train", path=data.sample_path("obqa", "train"))
    pairs = data.training_pairs(examples)
    encoded = data.encode_pairs(pairs, tok, max_length=48)
    batches = list(data.batches(encoded, batch_size=4, seed=3))
    assert len(batches) == data.steps_per_epoch(12, 4) == 3
    b = batches[0]
    assert {k: v.shape for k, v in b.items()} == {k: (4, 48) for k in ("input_ids", "attention_mask", "targets", "loss_mask")}
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
    answers = {answer for _, answer in pairs}
    for row in range(4):
        text = tok.decode(b["targets"][row][b["loss_mask"][row] > 0])
        assert text.endswith("<|endoftext|>") and text[1:-13] in answers and text.startswith(" ")
        n = int(b["attention_mask"][row].sum())
        assert (b["input_ids"][row, n:] == tok.pad_token_id).all()
    again = list(data.batches(encoded, batch_size=4, seed=3))
    resumed = list(data.batches(encoded, batch_size=4, seed=3, start=1))
    np.testing.assert_array_equal(again[2]["input_ids"], batches[2]["input_ids"])
    np.testing.assert_array_equal(resumed[0]["input_ids"], batches[1]["input_ids"])
    other_epoch = next(data.batches(encoded, batch_size=4, seed=3, epoch=1))
    assert not np.array_equal(other_epoch["input_ids"], b["input_ids"])


def test_long_prompts_are_cut_on_the_left_never_the_answer(tok):
    encoded = data.encode_pairs([("word " * 100, "the answer")], tok, max_length=16)
    b = data.collate(encoded, [0])
    assert int(b["attention_mask"].sum()) == 16
    assert tok.decode(b["targets"][0][b["loss_mask"][0] > 0]) == " the answer<|endoftext|>"
    with pytest.raises(data.DataError, match="the answer alone has"):
        data.encode_pairs([("q", "long answer " * 20)], tok, max_length=16)


def test_choice_batches_mask_exactly_the_choices(tok):
    examples = data.load_task("arc_challenge", "validation", path=data.sample_path("arc_challenge", "validation"))[:3]
    batches = list(data.choice_batches(examples, tok, batch_size=5, max_length=64))
    assert len(batches) == 3  # 12 rows in batches of 5
    rows = [(b, i) for b in batches for i in range(5) if b["example_index"][i] >= 0]
    assert len(rows) == 12
    for b, i in rows:
        e, c = b["example_index"][i], b["choice_index"][i]
        assert tok.decode(b["targets"][i][b["loss_mask"][i] > 0]) == " " + examples[e].choices[c]
        assert b["choice_chars"][i] == len(examples[e].choices[c])
    assert list(batches[-1]["example_index"][2:]) == [-1, -1, -1]
