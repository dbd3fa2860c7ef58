"""The thesis' seven commonsense tasks and the LLM-Adapters format: loading, prompts, batches.

Records keep their Hugging Face schemas and are read from local json / jsonl / parquet
files (or, where the hub is reachable, by dataset name). Each becomes an
:class:`Example`: a prompt and answer choices rendered with the PromptSource template
the thesis used (DESIGN.md §6), and the index of the correct choice.

The template texts, reconstructed from PromptSource's ``templates.yaml`` (``|||``
separates the prompt from the answer; the answer is appended as ``" " + choice``):

==============  ================================  ==========================================
task            template                           prompt / choices
==============  ================================  ==========================================
boolq           yes_no_question                    ``Text: {passage}\\n\\nAnswer the following
                                                   yes/no question: {question}? Yes or no?`` /
                                                   No, Yes
piqa            what_is_the_correct_ending         ``Goal: {goal}\\n\\nWhich is the correct
                                                   ending?\\n- {sol1}\\n- {sol2}\\n\\nAnswer:`` /
                                                   sol1, sol2
siqa            Show choices and generate index    ``Context: {context}\\nQuestion: {question}\\n
                                                   Which one of these answers best answers the
                                                   question according to the context?\\nA: …\\n
                                                   B: …\\nC: …`` / A, B, C
winogrande      underscore refer to                ``{sentence}\\nWhat does the _ in the above
                                                   sentence refer to? {option1} or {option2}?`` /
                                                   option1, option2
arc_easy        pick_the_most_correct_option       ``Pick the most correct option to answer the
                                                   following question.\\n\\n{question}\\n\\n
                                                   Options:\\n- A: …\\n- B: …`` / the labels
arc_challenge   qa_options                         ``{question}\\n\\nOptions:\\n- …\\n- …`` /
                                                   the choice texts
obqa            which_correct                      ``{question_stem}\\n\\nWhich is the correct
                                                   answer?\\n- …\\n- …`` / the choice texts
==============  ================================  ==========================================

Batches (numpy, all (batch, max_length)): ``input_ids``, ``attention_mask``, ``targets``
with ``targets[:, t] = input_ids[:, t + 1]`` (the next token), and ``loss_mask`` aligned
with ``targets``: 1 exactly where the target is an answer token (or the EOS closing it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

TASKS = ("boolq", "piqa", "siqa", "winogrande", "arc_easy", "arc_challenge", "obqa")
HUB_NAMES = {
    "boolq": ("google/boolq", None),
    "piqa": ("ybisk/piqa", None),
    "siqa": ("allenai/social_i_qa", None),
    "winogrande": ("allenai/winogrande", "winogrande_l"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "obqa": ("allenai/openbookqa", "main"),
}
ANSWER_PREFIX = " "
ASSETS = pathlib.Path(__file__).parent / "assets"


class DataError(ValueError):
    """A record that cannot be used, with the file and record index that hold it."""


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    label: int
    task: str
    source: str  # "file:index"


# ----------------------------------------------------------------------- templates


def _field(record: dict, name: str, where: str):
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field {name!r} (fields: {sorted(record)})")
    return record[name]


def _label(value, n: int, where: str, name: str, base: int = 0) -> int:
    try:
        label = int(value) - base
    except (TypeError, ValueError):
        raise DataError(f"{where}: field {name!r} = {value!r} is not a valid label") from None
    if not 0 <= label < n:
        raise DataError(f"{where}: field {name!r} = {value!r} is out of range for {n} choices")
    return label


def _keyed_choices(record: dict, where: str, key_field: str) -> tuple[list[str], list[str], int]:
    choices = _field(record, "choices", where)
    texts, labels = list(choices.get("text", [])), list(choices.get("label", []))
    if not texts or len(texts) != len(labels):
        raise DataError(f"{where}: field 'choices' has no choices or mismatched text/label lists: {choices!r}")
    key = str(_field(record, key_field, where))
    if key not in labels:
        raise DataError(f"{where}: field {key_field!r} = {key!r} is not one of the choice labels {labels}")
    return texts, labels, labels.index(key)


def _boolq(r, w):
    prompt = f"Text: {_field(r, 'passage', w)}\n\nAnswer the following yes/no question: {_field(r, 'question', w)}? Yes or no?"
    answer = _field(r, "answer", w)
    if not isinstance(answer, bool):
        raise DataError(f"{w}: field 'answer' = {answer!r} is not a bool")
    return prompt, ("No", "Yes"), int(answer)


def _piqa(r, w):
    sols = (_field(r, "sol1", w), _field(r, "sol2", w))
    prompt = f"Goal: {_field(r, 'goal', w)}\n\nWhich is the correct ending?\n- {sols[0]}\n- {sols[1]}\n\nAnswer:"
    return prompt, sols, _label(_field(r, "label", w), 2, w, "label")


def _siqa(r, w):
    answers = [_field(r, f"answer{c}", w) for c in "ABC"]
    prompt = (
        f"Context: {_field(r, 'context', w)}\nQuestion: {_field(r, 'question', w)}\n"
        "Which one of these answers best answers the question according to the context?\n"
        + "\n".join(f"{c}: {a}" for c, a in zip("ABC", answers))
    )
    return prompt, ("A", "B", "C"), _label(_field(r, "label", w), 3, w, "label", base=1)


def _winogrande(r, w):
    sentence = _field(r, "sentence", w)
    if "_" not in sentence:
        raise DataError(f"{w}: field 'sentence' has no '_' blank: {sentence!r}")
    options = (_field(r, "option1", w), _field(r, "option2", w))
    prompt = f"{sentence}\nWhat does the _ in the above sentence refer to? {options[0]} or {options[1]}?"
    return prompt, options, _label(_field(r, "answer", w), 2, w, "answer", base=1)


def _arc_easy(r, w):
    texts, labels, label = _keyed_choices(r, w, "answerKey")
    options = "\n".join(f"- {l}: {t}" for l, t in zip(labels, texts))
    prompt = f"Pick the most correct option to answer the following question.\n\n{_field(r, 'question', w)}\n\nOptions:\n{options}"
    return prompt, tuple(labels), label


def _arc_challenge(r, w):
    texts, _, label = _keyed_choices(r, w, "answerKey")
    return f"{_field(r, 'question', w)}\n\nOptions:\n- " + "\n- ".join(texts), tuple(texts), label


def _obqa(r, w):
    texts, _, label = _keyed_choices(r, w, "answerKey")
    prompt = f"{_field(r, 'question_stem', w)}\n\nWhich is the correct answer?\n- " + "\n- ".join(texts)
    return prompt, tuple(texts), label


RENDERERS: dict[str, Callable[[dict, str], tuple[str, tuple[str, ...], int]]] = {
    "boolq": _boolq, "piqa": _piqa, "siqa": _siqa, "winogrande": _winogrande,
    "arc_easy": _arc_easy, "arc_challenge": _arc_challenge, "obqa": _obqa,
}


# ------------------------------------------------------------------------- loading


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a .jsonl, .json (a list, or {"data": [...]}) or .parquet file."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif path.endswith(".jsonl"):
        records = []
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: invalid JSON: {e}") from None
    elif path.endswith(".json"):
        with open(path) as f:
            records = json.load(f)
        records = records.get("data", records) if isinstance(records, dict) else records
    else:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    if not records:
        raise DataError(f"{path}: the file holds no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}:{i}: a record must be an object, got {type(r).__name__}")
    return records


def load_task(name: str, split: str = "train", *, path: str | os.PathLike | None = None, limit: int | None = None) -> list[Example]:
    """Examples of a task from a local file (same fields as the HF dataset) or the hub."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if path is not None:
        records, origin = read_records(path), str(path)
    else:
        hub, subset = HUB_NAMES[name]
        try:
            import datasets

            records, origin = list(datasets.load_dataset(hub, subset, split=split)), f"{hub}:{split}"
        except Exception as e:  # noqa: BLE001 - any hub failure means: use a local file
            raise RuntimeError(f"could not load {hub} ({split}) from the hub ({e}); pass path= a local file with its fields") from e
    records = records[:limit] if limit is not None else records
    render = RENDERERS[name]
    examples = []
    for i, r in enumerate(records):
        where = f"{origin}:{i}"
        prompt, choices, label = render(r, where)
        if not choices:
            raise DataError(f"{where}: no answer choices")
        examples.append(Example(prompt, tuple(str(c) for c in choices), label, name, where))
    return examples


def sample_path(task: str, split: str) -> pathlib.Path:
    """The bundled sample file of a task (``train`` or ``validation``) in its HF schema."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return ASSETS / "sample_data" / task / f"{split}.jsonl"


ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def load_instructions(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, target) pairs of an LLM-Adapters file (commonsense_170k.json records:
    instruction, input, output, answer), rendered with its Alpaca-style prompt."""
    pairs = []
    for i, r in enumerate(read_records(path)[:limit]):
        where = f"{path}:{i}"
        instruction, output = _field(r, "instruction", where), _field(r, "output", where)
        _field(r, "answer", where)
        text = r.get("input") or ""
        prompt = ALPACA_INPUT.format(instruction=instruction, input=text) if text else ALPACA.format(instruction=instruction)
        pairs.append((prompt, output))
    return pairs


def training_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """(prompt, correct choice) for supervised fine-tuning."""
    return [(ex.prompt, ex.choices[ex.label]) for ex in examples]


# ---------------------------------------------------------------------- tokenizing


def default_tokenizer():
    """The small byte-level BPE bundled for demos and tests (``<|endoftext|>`` = 0 is bos/eos/pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer" / "tokenizer.json"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "eos_token_id"):  # a raw tokenizers.Tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _special_ids(tokenizer) -> tuple[int, int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and hasattr(tokenizer, "token_to_id"):
        eos = tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos, eos if pad is None else pad


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Tokenized sequences with the index where the answer starts, padded at batching time."""

    sequences: tuple[tuple[int, ...], ...]
    answer_starts: tuple[int, ...]
    max_length: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.sequences)


def _join(prompt: list[int], answer: list[int], max_length: int, where: str) -> tuple[list[int], int]:
    if len(answer) >= max_length:
        raise DataError(f"{where}: the answer alone has {len(answer)} tokens, more than max_length={max_length} allows")
    prompt = prompt[-(max_length - len(answer)) :]  # keep the end of the prompt, never cut the answer
    return prompt + answer, len(prompt)


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int, *, add_eos: bool = True) -> Encoded:
    """Tokenize ``prompt`` and ``ANSWER_PREFIX + answer`` (+ EOS) once; long prompts are cut on the left."""
    eos, pad = _special_ids(tokenizer)
    seqs, starts = [], []
    for i, (prompt, answer) in enumerate(pairs):
        answer_ids = _encode(tokenizer, ANSWER_PREFIX + answer) + ([eos] if add_eos else [])
        seq, start = _join(_encode(tokenizer, prompt), answer_ids, max_length, f"pair {i}")
        seqs.append(tuple(seq))
        starts.append(start)
    return Encoded(tuple(seqs), tuple(starts), max_length, pad)


def collate(encoded: Encoded, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """One right-padded batch of the given rows (see the module docstring for the fields)."""
    n, length = len(rows), encoded.max_length
    ids = np.full((n, length), encoded.pad_id, np.int32)
    attention = np.zeros((n, length), np.int32)
    loss_mask = np.zeros((n, length), np.float32)
    for b, row in enumerate(rows):
        seq, start = encoded.sequences[row], encoded.answer_starts[row]
        ids[b, : len(seq)] = seq
        attention[b, : len(seq)] = 1
        loss_mask[b, start - 1 : len(seq) - 1] = 1  # targets[t] = ids[t + 1] is an answer token
    targets = np.concatenate([ids[:, 1:], np.full((n, 1), encoded.pad_id, np.int32)], axis=1)
    return {"input_ids": ids, "attention_mask": attention, "targets": targets, "loss_mask": loss_mask}


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    encoded: Encoded, *, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0,
    shuffle: bool = True, drop_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch, shuffled by ``(seed, epoch)``; ``start`` skips the first
    ``start`` batches, so a resumed run continues its data stream exactly."""
    order = np.random.default_rng([seed, epoch]).permutation(len(encoded)) if shuffle else np.arange(len(encoded))
    for step in range(start, steps_per_epoch(len(encoded), batch_size, drop_last)):
        yield collate(encoded, order[step * batch_size : (step + 1) * batch_size].tolist())


def choice_batches(examples: Sequence[Example], tokenizer, *, batch_size: int, max_length: int) -> Iterator[dict[str, np.ndarray]]:
    """Scoring batches: one row per (example, choice), ``loss_mask`` on the choice tokens.

    Extra fields: ``example_index``, ``choice_index`` (int32) and ``choice_chars``; the last
    batch is filled up to ``batch_size`` with rows whose ``example_index`` is -1, so every
    batch has one shape.
    """
    pairs, owners = [], []
    for e, ex in enumerate(examples):
        for c, choice in enumerate(ex.choices):
            pairs.append((ex.prompt, choice))
            owners.append((e, c, len(choice)))
    encoded = encode_pairs(pairs, tokenizer, max_length, add_eos=False)
    for first in range(0, len(pairs), batch_size):
        rows = list(range(first, min(first + batch_size, len(pairs))))
        fill = batch_size - len(rows)
        batch = collate(encoded, rows + [rows[0]] * fill)
        meta = np.array([owners[r] for r in rows] + [(-1, -1, 0)] * fill, np.int32)
        batch.update(example_index=meta[:, 0], choice_index=meta[:, 1], choice_chars=meta[:, 2])
        yield batch
