"""jpeft.data: task schemas and PromptSource renderings, bad data, tokenization and batches."""

import gzip
import json
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from jpeft import data
from jpeft.assets import make_tokenizer, sample_records

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return data.default_tokenizer()


def train(task, template="promptsource"):
    return data.load_task(task, "train", path=data.sample_path(task, "train"), template=template)


SHARED_ARC = pathlib.Path(__file__).parents[2] / "shared" / "data" / "hf" / "arc_easy" / "train.jsonl"


# ------------------------------------------------------------ schemas and templates

EXPECTED = {  # (record index in train.jsonl, prompt, choices, label)
    "boolq": (0, "Text: The Sun is the star at the center of the Solar System. It is a nearly perfect ball of hot plasma.\n\n"
                 "Answer the following yes/no question: is the sun a star? Yes or no?", ("No", "Yes"), 1),
    "piqa": (0, "Goal: How do you keep bread fresh for longer?\n\nWhich is the correct ending?\n"
                "- Leave it uncovered on the counter.\n- Store it in a sealed bag at room temperature.\n\nAnswer:",
             ("Leave it uncovered on the counter.", "Store it in a sealed bag at room temperature."), 1),
    "siqa": (0, "Context: Alex forgot his lunch at home and had nothing to eat all day.\n\n"
                "Question: How would Alex feel afterwards?\n\n"
                "Which one of these answers best answers the question according to the context?\n\n"
                "A: full\n\nB: hungry\n\nC: proud", ("A", "B", "C"), 1),
    "winogrande": (0, "The trophy doesn't fit into the brown suitcase because the _ is too large.\n"
                      "What does the _ in the above sentence refer to? trophy or suitcase?", ("trophy", "suitcase"), 0),
    "arc_easy": (4, "Pick the most correct option to answer the following question.\n\nWhich animal is a mammal?\n\n"
                    "Options:\n\n- A: shark\n\n- B: dolphin\n\n- C: frog\n\n- D: eagle", ("A", "B", "C", "D"), 1),
    "arc_challenge": (0, "A student puts a metal spoon and a plastic spoon in a cup of hot water. After a minute the metal "
                         "spoon feels hotter. Which property of metal explains this?\n\nOptions:\n"
                         "- Metal is a good insulator.\n- Metal is a good conductor of heat.\n"
                         "- Metal is attracted to magnets.\n- Metal has a high melting point.",
                      ("Metal is a good insulator.", "Metal is a good conductor of heat.",
                       "Metal is attracted to magnets.", "Metal has a high melting point."), 1),
    "obqa": (0, "A magnet will stick to\n\nWhich is the correct answer?\n- a wooden spoon\n- an iron nail\n"
                "- a glass cup\n- a paper towel", ("a wooden spoon", "an iron nail", "a glass cup", "a paper towel"), 1),
}


@pytest.mark.parametrize("task", data.TASKS)
def test_bundled_task_renders_its_template(task):
    index, prompt, choices, label = EXPECTED[task]
    examples = train(task)
    assert len(examples) == 24 and len(data.load_task(task, "validation", path=data.sample_path(task, "validation"))) == 12
    path = str(data.sample_path(task, "train"))
    assert examples[index] == data.Example(prompt, choices, label, task, f"{path}:{index}")
    assert all(0 <= ex.label < len(ex.choices) for ex in examples)


def test_arc_easy_letters_follow_positions_for_any_number_of_choices():
    by_len = {len(ex.choices): ex for t in ("train", "validation")
              for ex in data.load_task("arc_easy", t, path=data.sample_path("arc_easy", t))}
    assert by_len[3].choices == ("A", "B", "C") and by_len[5].choices == ("A", "B", "C", "D", "E")
    assert by_len[5].prompt.endswith("\n\n- D: ten\n\n- E: twelve")


def test_instructions_render_the_llm_adapters_prompts(tmp_path):
    pairs = data.load_instructions(data.ASSETS / "sample_data" / "commonsense_mini.json")
    assert len(pairs) == 35
    assert pairs[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nPlease answer the following question with true or false, question: is the sun a star?\n\n"
        "Answer format: true/false\n\n### Response:\n",
        "the correct answer is true",
    )
    path = tmp_path / "with_input.json"
    path.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "answer": "5"}]))
    assert data.load_instructions(path) == [(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n", "5")]


def test_bundled_files_match_their_generator():
    for task in data.TASKS:
        records = sample_records.rows(task)
        assert data.read_records(data.sample_path(task, "train")) + data.read_records(data.sample_path(task, "validation")) == records
    assert data.read_records(data.ASSETS / "sample_data" / "commonsense_mini.json") == sample_records.instructions()


@pytest.mark.parametrize("task", ["arc_easy", "siqa"])
def test_parquet_json_array_and_json_lines_load_alike(task, tmp_path):
    records = data.read_records(data.sample_path(task, "train"))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    (tmp_path / "array.json").write_text(json.dumps(records))
    (tmp_path / "lines.json").write_text("\n".join(map(json.dumps, records)))
    (tmp_path / "data.json").write_text(json.dumps({"data": records}))
    strip = lambda exs: [(e.prompt, e.choices, e.label) for e in exs]  # noqa: E731
    expected = strip(train(task))
    for name in ("r.parquet", "array.json", "lines.json", "data.json"):
        loaded = data.load_task(task, path=tmp_path / name)
        assert strip(loaded) == expected, name
        assert loaded[3].source == f"{tmp_path / name}:3"
    both = data.load_task(task, path=[tmp_path / "r.parquet", tmp_path / "array.json"], limit=30)
    assert strip(both) == expected + expected[:6] and both[-1].source == f"{tmp_path / 'array.json'}:5"


def test_unknown_task_and_unreachable_hub(monkeypatch):
    with pytest.raises(ValueError, match="boolq, piqa, siqa, winogrande, arc_easy, arc_challenge, obqa"):
        data.load_task("hellaswag", path=data.sample_path("boolq", "train"))
    with pytest.raises(ValueError, match="unknown task"):
        data.sample_path("copa", "train")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="google/boolq.*no route.*Pass path="):
        data.load_task("boolq", "validation")


# ------------------------------------------------------------------------ bad data

GOOD = {task: data.read_records(data.sample_path(task, "train"))[0] for task in data.TASKS}
BAD = [  # (task, change to a good record, field named in the error)
    ("boolq", {"passage": None}, "passage"),
    ("boolq", {"answer": "yes"}, "answer"),
    ("piqa", {"label": 2}, "label"),
    ("piqa", {"label": -1}, "label"),  # the unlabelled PIQA test split
    ("piqa", {"sol2": None}, "sol2"),
    ("siqa", {"label": "4"}, "label"),
    ("siqa", {"label": "0"}, "label"),
    ("siqa", {"answerC": None}, "answerC"),
    ("winogrande", {"sentence": "The trophy does not fit in the suitcase."}, "sentence"),
    ("winogrande", {"answer": ""}, "answer"),  # the unlabelled WinoGrande test split
    ("arc_easy", {"choices": {"text": [], "label": []}}, "choices"),
    ("arc_challenge", {"choices": {"text": ["a", "b"], "label": ["A"]}}, "choices"),
    ("arc_challenge", {"answerKey": "E"}, "answerKey"),
    ("obqa", {"question_stem": None}, "question_stem"),
    ("obqa", {"choices": None}, "choices"),
]


@pytest.mark.parametrize("task,change,field", BAD, ids=[f"{t}-{f}-{i}" for i, (t, _, f) in enumerate(BAD)])
def test_bad_record_names_file_record_and_field(task, change, field, tmp_path):
    bad = {k: v for k, v in {**GOOD[task], **change}.items() if v is not None}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD[task]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}: record 1: .*'{field}'"):
        data.load_task(task, path=path)


def test_bad_files(tmp_path):
    empty, blank, broken, scalar, other = (tmp_path / n for n in ("e.jsonl", "b.json", "x.jsonl", "s.json", "t.csv"))
    empty.write_text("")
    blank.write_text("[]")
    broken.write_text(json.dumps(GOOD["piqa"]) + "\n{oops\n")
    scalar.write_text("[1]")
    other.write_text("a,b")
    for path, message in [(empty, "the file holds no records"), (blank, "the file holds no records"), (broken, "line 2: invalid JSON"),
                          (scalar, "record 0: a record must be an object"), (other, "unsupported file type")]:
        with pytest.raises(data.DataError, match=re.escape(f"{path}: {message}")):
            data.load_task("piqa", path=path)
    instructions = tmp_path / "i.json"
    instructions.write_text(json.dumps([{"instruction": "x", "input": "", "output": "y", "answer": "y"}, {"instruction": "x", "answer": "y"}]))
    with pytest.raises(data.DataError, match=re.escape(f"{instructions}: record 1: missing field 'output'")):
        data.load_instructions(instructions)


# ---------------------------------------------------------------- training batches


def check_batch(batch, rows, tok, pairs, encoded):
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((len(rows), 48), np.int32), "attention_mask": ((len(rows), 48), np.int32),
        "targets": ((len(rows), 48), np.int32), "loss_mask": ((len(rows), 48), np.float32)}
    np.testing.assert_array_equal(batch["targets"][:, :-1], ids[:, 1:])
    assert (batch["targets"][:, -1] == 0).all()
    for b, row in enumerate(rows):
        n = len(encoded.sequences[row])
        np.testing.assert_array_equal(ids[b, :n], encoded.sequences[row])
        assert (ids[b, n:] == 0).all() and batch["attention_mask"][b].tolist() == [1] * n + [0] * (48 - n)
        assert tok.decode(batch["targets"][b][mask[b] == 1]) == pairs[row][1] + EOS
        on = np.flatnonzero(mask[b])
        assert on[-1] == n - 2 and len(on) == on[-1] - on[0] + 1  # contiguous, ends predicting the EOS
        assert tok.decode(ids[b, : on[0] + 1]) == pairs[row][0] or n == 48  # the whole prompt unless cut


def test_training_batches_mask_exactly_the_answer_and_eos(tok):
    pairs = data.training_pairs(train("obqa") + train("boolq"))
    assert pairs[0][1] == " an iron nail"
    encoded = data.encode_pairs(pairs, tok, 48)
    assert any(len(s) == 48 for s in encoded.sequences)  # some boolq prompts are cut
    for step, batch in enumerate(data.batches(encoded, batch_size=5, seed=0, shuffle=False, drop_last=False)):
        check_batch(batch, list(range(5 * step, min(5 * step + 5, len(pairs)))), tok, pairs, encoded)
    order = np.random.default_rng([3, 1]).permutation(len(pairs))
    for step, batch in enumerate(data.batches(encoded, batch_size=8, seed=3, epoch=1)):
        check_batch(batch, order[8 * step : 8 * step + 8].tolist(), tok, pairs, encoded)


def test_batches_pad_to_their_longest_sequence_not_to_max_length(tok):
    encoded = data.encode_pairs(data.training_pairs(train("piqa")), tok, 512)
    rounded = lambda rows: -(-max(len(encoded.sequences[r]) for r in rows) // data.PAD_MULTIPLE) * data.PAD_MULTIPLE  # noqa: E731
    for rows in ([0, 1], [2], list(range(len(encoded)))):
        assert data.collate(encoded, rows)["input_ids"].shape == (len(rows), rounded(rows)) and rounded(rows) < 512
    capped = data.encode_pairs(data.training_pairs(train("piqa")), tok, rounded([0]) - 3)
    assert data.collate(capped, [0])["input_ids"].shape[1] == rounded([0]) - 3


def test_instruction_records_as_multiple_choice(tmp_path):
    mini = data.ASSETS / "sample_data" / "commonsense_mini.json"
    examples = data.load_instruction_examples(mini)
    by_format = {ex.choices: ex for ex in examples}
    assert set(by_format) >= {("the correct answer is true", "the correct answer is false"),
                              ("the correct answer is solution1", "the correct answer is solution2"),
                              ("the correct answer is option1", "the correct answer is option2")}
    first = examples[0]
    assert first.prompt == data.load_instructions(mini)[0][0] and first.prompt.endswith("### Response:\n")
    assert first.answer_prefix == "" and first.choices[first.label] == "the correct answer is true"
    # training on the same record teaches exactly the continuation that is scored
    assert data.training_pairs([first]) == [(first.prompt, "the correct answer is true")]
    assert examples[0].task == "commonsense_mini" and examples[3].source.endswith("commonsense_mini.json:3")
    record = {"instruction": "Q?\n\nAnswer1: a\n\nAnswer format: answer1/answer2", "input": "", "output": "", "answer": "answer2"}
    for broken, message in [({"instruction": "Q? no format"}, "record 1: field 'instruction' has no 'Answer format"),
                            ({"answer": "answer3"}, r"record 1: field 'answer' = 'answer3' is not one of the format's"),
                            ({"instruction": "Answer format: answer1"}, "lists fewer than two answers"),
                            ({"answer": None}, "record 1: missing field 'answer'")]:
        path = tmp_path / "broken.json"
        path.write_text(json.dumps([record, {**record, **broken}]))
        with pytest.raises(data.DataError, match=message):
            data.load_instruction_examples(path)


def test_answers_are_read_from_generations_as_llm_adapters_reads_them():
    answers = [f"answer{i}" for i in range(1, 6)]
    assert data.extract_answer("the correct answer is answer3.", answers) == "answer3"
    assert data.extract_answer("answer2, not answer1", answers) == "answer2"  # the first one named
    assert data.extract_answer("no idea", answers) is None
    assert data.extract_answer("the answer is false", ["true", "false"]) == "false"
    assert data.extract_answer("option10", ["option1", "option10"]) == "option10"  # the longer name wins


def test_holdout_is_fixed_disjoint_and_complete(tmp_path):
    examples = train("arc_easy")
    rest, held = data.holdout(examples, 5)
    again_rest, again_held = data.holdout(examples, 5)
    assert held == again_held and rest == again_rest and len(held) == 5 and len(rest) == len(examples) - 5
    assert sorted(ex.source for ex in rest + held) == sorted(ex.source for ex in examples)
    # the same records whatever is held out of: records or examples, one file or its gzip copy
    records = data.read_records(data.sample_path("arc_easy", "train"))
    assert [r["question"] for r in data.holdout(records, 5)[1]] == [ex.prompt.split("\n")[0].removeprefix("Question: ")
                                                                      for ex in data.holdout(train("arc_easy", "harness"), 5)[1]]
    packed = tmp_path / "train.jsonl.gz"
    packed.write_bytes(gzip.compress(data.sample_path("arc_easy", "train").read_bytes()))
    assert data.read_records(packed) == records
    for n in (0, len(examples), True):
        with pytest.raises(ValueError, match="holdout must be an integer in"):
            data.holdout(examples, n)


@pytest.mark.skipif(not SHARED_ARC.exists(), reason=f"the LLM-Adapters ARC-Easy records are not at {SHARED_ARC}")
def test_the_bundled_demo_records_are_the_held_out_split_of_arc_easy():
    records = data.read_records(SHARED_ARC)
    rest, held = data.holdout(records, 200)
    assert data.read_records(data.ASSETS / "arc_easy" / "validation.jsonl.gz") == held
    assert data.read_records(data.ASSETS / "arc_easy" / "train.jsonl.gz") == rest


def test_instruction_targets_are_verbatim(tok):
    pairs = data.load_instructions(data.ASSETS / "sample_data" / "commonsense_mini.json", limit=4)
    batch = data.collate(data.encode_pairs(pairs, tok, 256), [0])
    assert tok.decode(batch["targets"][0][batch["loss_mask"][0] == 1]) == "the correct answer is true" + EOS
    assert tok.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1]) == pairs[0][0] + pairs[0][1] + EOS


def test_long_prompts_are_cut_on_the_left_and_long_answers_raise(tok):
    prompt, answer = "one two three four five six seven eight nine ten", " eleven twelve"
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [0]
    encoded = data.encode_pairs([(prompt, answer)], tok, len(answer_ids) + 3)
    seq, start = encoded.sequences[0], encoded.answer_starts[0]
    assert len(seq) == len(answer_ids) + 3 and start == 3 and list(seq[start:]) == answer_ids
    assert list(seq[:start]) == tok(prompt, add_special_tokens=False)["input_ids"][-start:]
    with pytest.raises(data.DataError, match="pair 0: the answer has"):
        data.encode_pairs([(prompt, answer)], tok, len(answer_ids))
    with pytest.raises(data.DataError, match="pair 1: the prompt has no tokens"):
        data.encode_pairs([(prompt, answer), ("", answer)], tok, 32)


def test_raw_tokenizer_and_pad_fallback(tok):
    raw = tokenizers.Tokenizer.from_file(str(data.ASSETS / "tokenizer" / "tokenizer.json"))
    pairs = data.training_pairs(train("piqa"))
    assert data.encode_pairs(pairs, raw, 64) == data.encode_pairs(pairs, tok, 64)
    raw.enable_padding(pad_id=5, pad_token=raw.id_to_token(5))
    assert data.special_ids(raw) == (0, 5)
    assert data.encode_pairs(pairs, raw, 64).pad_id == 5
    no_pad = data.default_tokenizer()
    no_pad.pad_token = None
    assert data.special_ids(no_pad) == (0, 0)


def test_batches_are_deterministic_and_resumable(tok):
    encoded = data.encode_pairs(data.training_pairs(train("siqa")), tok, 64)
    run = lambda **kw: list(data.batches(encoded, batch_size=5, seed=7, **kw))  # noqa: E731
    first, again, other_epoch = run(), run(), run(epoch=1)
    assert len(first) == data.steps_per_epoch(24, 5) == 4 and data.steps_per_epoch(24, 5, drop_last=False) == 5
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert any((a["input_ids"] != b["input_ids"]).any() for a, b in zip(first, other_epoch))
    for k in (1, 3, 4):
        resumed = run(start=k)
        assert len(resumed) == 4 - k
        for a, b in zip(resumed, first[k:]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    rows = np.concatenate([b["input_ids"] for b in run(drop_last=False)])
    assert rows.shape == (24, 64) and len({r.tobytes() for r in rows}) == 24  # every pair once, last batch 4 rows


# ----------------------------------------------------------------- scoring batches


def test_choice_batches_mask_exactly_the_choices_and_pad_the_last_batch(tok):
    examples = train("arc_challenge")[:3] + train("boolq")[:2] + train("winogrande")[:1]
    batches = list(data.choice_batches(examples, tok, batch_size=4, max_length=128))
    rows = [(b, i) for b in batches for i in range(4)]
    # each batch as wide as its longest row rounded up to PAD_MULTIPLE, not max_length
    widths = [-(-int(b["attention_mask"].sum(1).max()) // data.PAD_MULTIPLE) * data.PAD_MULTIPLE for b in batches]
    assert len(batches) == 5 and [b["input_ids"].shape for b in batches] == [(4, min(w, 128)) for w in widths]
    assert all(b[k].dtype == np.int32 for b in batches for k in ("example_index", "choice_index", "choice_chars"))
    seen = []
    for b, i in rows:
        e, c = int(b["example_index"][i]), int(b["choice_index"][i])
        if e < 0:
            assert c == -1 and b["choice_chars"][i] == 0 and not b["loss_mask"][i].any()
            continue
        seen.append((e, c))
        ex, mask = examples[e], b["loss_mask"][i] == 1
        assert tok.decode(b["targets"][i][mask]) == data.ANSWER_PREFIX + ex.choices[c]
        assert tok.decode(b["input_ids"][i][b["attention_mask"][i] == 1]) == ex.prompt + data.ANSWER_PREFIX + ex.choices[c]
        assert b["choice_chars"][i] == len(ex.choices[c])
        np.testing.assert_array_equal(b["targets"][i][:-1], b["input_ids"][i][1:])
    assert seen == [(e, c) for e, ex in enumerate(examples) for c in range(len(ex.choices))]
    assert (batches[-1]["example_index"] == [5, 5, -1, -1]).all()


# ------------------------------------------------------------------------ tokenizer


def test_bundled_tokenizer(tok):
    path = data.ASSETS / "tokenizer" / "tokenizer.json"
    assert path.stat().st_size < 200_000
    assert len(tok) == 1024 and tok.convert_ids_to_tokens(0) == EOS
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 0
    text = "Which is the correct answer?\n- héllo wörld 42"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert json.loads(make_tokenizer.train().to_str()) == json.loads(path.read_text())  # make_tokenizer reproduces it


# ------------------------------------------------------- lm-evaluation-harness' templates

HARNESS = {  # record -> (prompt, choices, label, per-choice prompts or None), as the harness renders them
    "boolq": ({"passage": "Water boils at 100 C at sea level.", "question": "does water boil at 100 c", "answer": True},
              ("Water boils at 100 C at sea level.\nQuestion: does water boil at 100 c?\nAnswer:", ("no", "yes"), 1, None)),
    "piqa": ({"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Freeze the lid.", "label": 0},
             ("Question: Open a jar.\nAnswer:", ("Twist the lid.", "Freeze the lid."), 0, None)),
    "siqa": ({"context": "Sam gave Ana a gift.", "question": "How does Ana feel?", "answerA": "happy",
              "answerB": "bored", "answerC": "angry", "label": "1"},
             ("Q: Sam gave Ana a gift. How does Ana feel?\nA:", ("happy", "bored", "angry"), 0, None)),
    "winogrande": ({"sentence": "The cup fell off the table because _ was too close to the edge.",
                    "option1": "the cup", "option2": "the table", "answer": "1"},
                   ("The cup fell off the table because the cup", ("was too close to the edge.",) * 2, 0,
                    ("The cup fell off the table because the cup", "The cup fell off the table because the table"))),
    "arc_easy": ({"question": "Which is a liquid?", "choices": {"text": ["ice", "water", "steam"], "label": ["A", "B", "C"]},
                  "answerKey": "B"}, ("Question: Which is a liquid?\nAnswer:", ("ice", "water", "steam"), 1, None)),
    "obqa": ({"question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
              "answerKey": "A"}, ("Question: The sun is a\nAnswer:", ("star", "planet"), 0, None)),
}


@pytest.mark.parametrize("task", list(HARNESS))
def test_harness_templates_render_as_the_harness(task, tmp_path, tok):
    record, (prompt, choices, label, prompts) = HARNESS[task]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (ex,) = data.load_task(task, path=path, template="harness")
    assert (ex.prompt, ex.choices, ex.label, ex.prompts) == (prompt, choices, label, prompts)
    # the pair trained on and the rows scored follow each choice's own prompt
    assert data.training_pairs([ex]) == [(ex.prompt_for(label), " " + choices[label])]
    (batch,) = data.choice_batches([ex], tok, batch_size=len(choices), max_length=64)
    for c in range(len(choices)):
        row = batch["input_ids"][c][batch["attention_mask"][c] == 1]
        assert tok.decode(row) == ex.prompt_for(c) + " " + choices[c]
    assert data.load_task(task, path=path)[0].prompt != prompt  # the thesis' PromptSource rendering differs


def test_unknown_template_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown template 'helm'; templates: promptsource, harness"):
        data.load_task("piqa", path=data.sample_path("piqa", "train"), template="helm")
