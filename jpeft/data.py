"""Thesis tasks, their PromptSource prompts, tokenization and batching.

Every record of the seven tasks (in its Hugging Face schema) becomes an :class:`Example`:
a prompt, the answer choices a model scores, and the index of the correct one. Prompts and
choices are rendered exactly as PromptSource renders the thesis' templates (its Jinja
output, split at ``|||``, each side stripped). The model sees ``prompt + " " + choice``
(:data:`TARGET_SEP`), both for training and for scoring.

========= =================================== ========================================================== ==========================
task      PromptSource template               prompt (``{field}`` = record field)                        choices
========= =================================== ========================================================== ==========================
boolq     super_glue/boolq                    ``Text: {passage}\\n\\nAnswer the following yes/no question: ``No``, ``Yes``
          ``yes_no_question``                 {question}? Yes or no?``
piqa      piqa ``what_is_the_correct_ending`` ``Goal: {goal}\\n\\nWhich is the correct ending?\\n- {sol1}\\n- ``{sol1}``, ``{sol2}``
                                              {sol2}\\n\\nAnswer:``
siqa      social_i_qa ``Show choices and      ``Context: {context}\\n\\nQuestion: {question}\\n\\nWhich one  ``A``, ``B``, ``C``
          generate index``                    of these answers best answers the question according to
                                              the context?\\n\\nA: {answerA}\\n\\nB: {answerB}\\n\\nC:
                                              {answerC}``
winogrande winogrande ``underscore refer to`` ``{sentence}\\nWhat does the _ in the above sentence refer   ``{option1}``, ``{option2}``
                                              to? {option1} or {option2}?``
arc_easy  ai2_arc                             ``Pick the most correct option to answer the following      the labels (``A``.. or
          ``pick_the_most_correct_option``    question.\\n\\n{question}\\n\\nOptions:\\n\\n- {label}: {text}  ``1``..)
                                              ...`` (one ``\\n\\n- {label}: {text}`` per choice)
arc_chall ai2_arc ``qa_options``              ``{question}\\n\\nOptions:\\n- {text1}\\n- {text2}...``        the choice texts
obqa      openbookqa ``which_correct``        ``{question_stem}\\n\\nWhich is the correct answer?\\n-       the choice texts
                                              {text1}\\n- {text2}...``
========= =================================== ========================================================== ==========================

The texts are written from memory of promptsource's ``templates.yaml`` and agree with the
thesis' examples (section 3); the blank lines follow from the YAML folding and the Jinja
loop of ``pick_the_most_correct_option`` (no ``trim_blocks``).

Batches (:func:`make_batches`, :func:`scoring_batches`) are dicts of numpy arrays:
``input_ids`` (B, L) int32, right-padded with the pad id (eos if the tokenizer has none);
``attention_mask`` (B, L) int32; ``targets = input_ids[:, 1:]`` (B, L-1) int32; and
``loss_mask`` (B, L-1) float32, aligned with ``targets``: 1 where ``targets`` is an answer
token. So ``logits[:, :-1]`` of a causal LM are scored against ``targets``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import tokenizers

ASSETS = Path(__file__).parent / "assets"
SAMPLE_DIR = ASSETS / "sample_data"
#: Bundled LLM-Adapters-format instructions (30 records, like ``commonsense_170k.json``).
SAMPLE_INSTRUCTIONS = SAMPLE_DIR / "commonsense_mini.json"
TOKENIZER_FILE = ASSETS / "tokenizer" / "tokenizer.json"
EOT = "<|endoftext|>"
#: Joins a prompt and an answer choice: the model sees ``prompt + TARGET_SEP + choice``.
TARGET_SEP = " "
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

#: LLM-Adapters / Alpaca prompts; the training target (``output``) follows directly.
INSTRUCTION_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCTION_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Tokenizer = Union["transformers.PreTrainedTokenizerBase", tokenizers.Tokenizer]  # noqa: F821
Batch = dict[str, np.ndarray]


class DataError(ValueError):
    """A bad record or file; the message names the file, the record index and the field."""

    def __init__(self, file: str | os.PathLike, message: str, *, index: int | None = None,
                 field: str | None = None):
        self.file, self.index, self.field = str(file), index, field
        where = "".join([f", record {index}" if index is not None else "",
                         f", field {field!r}" if field is not None else ""])
        super().__init__(f"{file}{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered task record: the model scores ``prompt + TARGET_SEP + choices[i]``."""

    prompt: str
    choices: tuple[str, ...]
    label: int  # index of the correct choice
    task: str
    source: str  # "file:record-index", to find the record again


@dataclasses.dataclass(frozen=True)
class _Record:
    """A raw record with its origin, whose accessors raise :class:`DataError`."""

    data: Mapping[str, Any]
    file: str
    index: int

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.file, message, index=self.index, field=field)

    def get(self, field: str, kind: type | tuple[type, ...] = str) -> Any:
        if field not in self.data or self.data[field] is None:
            raise self.error(field, "missing field")
        value = self.data[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(field, f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def pick(self, field: str, allowed: Sequence[Any]) -> int:
        """The index of the field's value within ``allowed`` (a label out of range raises)."""
        value = self.data.get(field)
        if field not in self.data:
            raise self.error(field, "missing field")
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise self.error(field, f"label {value!r} out of range; expected one of {list(allowed)}")
        return list(allowed).index(value)

    def choices(self) -> tuple[list[str], list[str]]:
        """ARC/OBQA ``choices``: (texts, labels), non-empty and of equal length."""
        choices = self.get("choices", Mapping)
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, Sequence) or not isinstance(labels, Sequence) or not texts:
            raise self.error("choices", f"no choices (need non-empty text and label lists), got {choices!r}")
        if len(texts) != len(labels) or not all(isinstance(s, str) for s in [*texts, *labels]):
            raise self.error("choices", f"text and label must be lists of strings of equal length, got {choices!r}")
        return list(texts), list(labels)


def _boolq(r: _Record) -> tuple[str, list[str], int]:
    prompt = (f"Text: {r.get('passage')}\n\nAnswer the following yes/no question: "
              f"{r.get('question')}? Yes or no?")
    return prompt, ["No", "Yes"], r.pick("answer", [False, True])


def _piqa(r: _Record) -> tuple[str, list[str], int]:
    sol1, sol2 = r.get("sol1"), r.get("sol2")
    prompt = f"Goal: {r.get('goal')}\n\nWhich is the correct ending?\n- {sol1}\n- {sol2}\n\nAnswer:"
    return prompt, [sol1, sol2], r.pick("label", [0, 1])


def _siqa(r: _Record) -> tuple[str, list[str], int]:
    prompt = (f"Context: {r.get('context')}\n\nQuestion: {r.get('question')}\n\nWhich one of these "
              "answers best answers the question according to the context?\n\n"
              f"A: {r.get('answerA')}\n\nB: {r.get('answerB')}\n\nC: {r.get('answerC')}")
    return prompt, ["A", "B", "C"], r.pick("label", ["1", "2", "3"])


def _winogrande(r: _Record) -> tuple[str, list[str], int]:
    sentence, option1, option2 = r.get("sentence"), r.get("option1"), r.get("option2")
    if "_" not in sentence:
        raise r.error("sentence", f"no '_' blank in {sentence!r}")
    prompt = f"{sentence}\nWhat does the _ in the above sentence refer to? {option1} or {option2}?"
    return prompt, [option1, option2], r.pick("answer", ["1", "2"])


def _arc_easy(r: _Record) -> tuple[str, list[str], int]:
    texts, labels = r.choices()
    options = "".join(f"\n- {label}: {text}\n" for label, text in zip(labels, texts))
    prompt = ("Pick the most correct option to answer the following question.\n\n"
              f"{r.get('question')}\n\nOptions:\n{options}")
    return prompt, labels, r.pick("answerKey", labels)


def _arc_challenge(r: _Record) -> tuple[str, list[str], int]:
    texts, labels = r.choices()
    prompt = f"{r.get('question')}\n\nOptions:\n- " + "\n- ".join(texts)
    return prompt, texts, r.pick("answerKey", labels)


def _obqa(r: _Record) -> tuple[str, list[str], int]:
    texts, labels = r.choices()
    prompt = f"{r.get('question_stem')}\n\nWhich is the correct answer?\n- " + "\n- ".join(texts)
    return prompt, texts, r.pick("answerKey", labels)


@dataclasses.dataclass(frozen=True)
class Task:
    """Where a task lives on the hub and how its records are rendered."""

    hub: str
    config: str | None
    template: str  # PromptSource template name
    render: Callable[[_Record], tuple[str, list[str], int]]


TASKS: dict[str, Task] = {
    "boolq": Task("google/boolq", None, "yes_no_question", _boolq),
    "piqa": Task("ybisk/piqa", None, "what_is_the_correct_ending", _piqa),
    "siqa": Task("allenai/social_i_qa", None, "Show choices and generate index", _siqa),
    "winogrande": Task("allenai/winogrande", "winogrande_l", "underscore refer to", _winogrande),
    "arc_easy": Task("allenai/ai2_arc", "ARC-Easy", "pick_the_most_correct_option", _arc_easy),
    "arc_challenge": Task("allenai/ai2_arc", "ARC-Challenge", "qa_options", _arc_challenge),
    "obqa": Task("allenai/openbookqa", "main", "which_correct", _obqa),
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def sample_path(task: str, split: str) -> Path:
    """Path of the bundled sample file of ``task`` (``split``: "train" or "validation")."""
    _task(task)
    if split not in ("train", "validation"):
        raise ValueError(f"no bundled split {split!r}; expected 'train' or 'validation'")
    return SAMPLE_DIR / task / f"{split}.jsonl"


def read_records(file: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a .jsonl, .json (an array or JSON lines) or .parquet file.

    Raises :class:`DataError` for an empty file, unparsable JSON or a non-object record.
    """
    file = Path(file)
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(file).to_pylist()
    elif file.suffix in (".json", ".jsonl"):
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json" and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(file, f"invalid JSON: {e}") from None
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(file, f"invalid JSON line: {e}", index=i) from None
    else:
        raise DataError(file, f"unsupported file type; expected one of {FILE_SUFFIXES}")
    if not records:
        raise DataError(file, "empty file (no records)")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(file, f"expected a JSON object, got {record!r}", index=i)
    return records


def _files(path: str | os.PathLike | Sequence[str | os.PathLike], split: str) -> list[Path]:
    if not isinstance(path, (str, os.PathLike)):
        return [Path(p) for p in path]
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = [path / f"{split}{s}" for s in FILE_SUFFIXES if (path / f"{split}{s}").exists()]
    if not found:
        raise FileNotFoundError(f"no {split}{{{','.join(FILE_SUFFIXES)}}} in {path}")
    return found


def load_task(name: str, split: str, *, path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
              limit: int | None = None) -> list[Example]:
    """Load and render the ``split`` of task ``name`` (one of :data:`TASKS`).

    ``path``: a .jsonl/.json/.parquet file, a list of them, or a directory holding
    ``{split}.jsonl`` (or .json/.parquet), with the fields of the task's HF schema. Without
    ``path`` the split is loaded from the hub with ``datasets.load_dataset``. ``limit`` keeps
    the first records. Every bad record raises :class:`DataError`; none is dropped.
    """
    task = _task(name)
    if path is None:
        sources = [(f"{task.hub}:{task.config or 'default'}:{split}", _hub_records(name, task, split))]
    else:
        sources = [(str(f), read_records(f)) for f in _files(path, split)]
    examples = []
    for file, records in sources:
        for i, data in enumerate(records):
            if limit is not None and len(examples) >= limit:
                return examples
            prompt, choices, label = task.render(_Record(data, file, i))
            examples.append(Example(prompt.strip(), tuple(c.strip() for c in choices), label, name, f"{file}:{i}"))
    return examples


def _hub_records(name: str, task: Task, split: str) -> Iterable[Mapping[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(task.hub, task.config, split=split)
    except Exception as e:
        e.add_note(f"jpeft.data.load_task({name!r}, {split!r}) could not load {task.hub!r} from the "
                   "Hugging Face hub; pass path= to local .jsonl/.json/.parquet file(s) with its fields "
                   f"(e.g. jpeft.data.sample_path({name!r}, 'train'))")
        raise


def load_instructions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, target) pairs from LLM-Adapters records (instruction, input, output, answer).

    The prompt is :data:`INSTRUCTION_PROMPT` (or :data:`INSTRUCTION_PROMPT_WITH_INPUT` when
    ``input`` is non-empty); the target is ``output``, appended without separator.
    """
    pairs = []
    for i, data in enumerate(read_records(path)):
        r = _Record(data, str(path), i)
        instruction, output = r.get("instruction"), r.get("output")
        extra = data.get("input") or ""
        if not isinstance(extra, str):
            raise r.error("input", f"expected str, got {extra!r}")
        template = INSTRUCTION_PROMPT_WITH_INPUT if extra else INSTRUCTION_PROMPT
        pairs.append((template.format(instruction=instruction, input=extra), output))
    return pairs


def training_pairs(examples: Iterable[Example]) -> list[tuple[str, str]]:
    """(prompt, ``TARGET_SEP + correct choice``) for each example."""
    return [(ex.prompt, TARGET_SEP + ex.choices[ex.label]) for ex in examples]


def default_tokenizer() -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """The bundled byte-level BPE (1024 tokens; ``<|endoftext|>`` is bos, eos and pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for a HF or a ``tokenizers`` tokenizer."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(eos id, pad id); the pad id falls back to eos. A raw ``tokenizers.Tokenizer`` uses
    ``<|endoftext|>`` as eos and its padding id if padding is enabled."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        eos = tokenizer.token_to_id(EOT)
        pad = tokenizer.padding["pad_id"] if tokenizer.padding else eos
    else:
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None or pad is None:
        raise ValueError(f"tokenizer has no eos token ({EOT!r} for a tokenizers.Tokenizer); set one")
    return eos, pad


def _encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_length: int,
                  add_eos: bool) -> list[tuple[list[int], int]]:
    """(token ids, number of answer tokens at the end) per pair; prompts are cut on the left."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs")
    eos = special_ids(tokenizer)[0]
    out = []
    for i, (prompt, answer) in enumerate(pairs):
        p, a = encode(tokenizer, prompt), encode(tokenizer, answer) + [eos] * add_eos
        if not p or not a:
            raise ValueError(f"pair {i}: empty {'prompt' if not p else 'answer'} ({prompt[:60]!r}, {answer[:60]!r})")
        if len(a) >= max_length:
            raise ValueError(f"pair {i}: the answer has {len(a)} tokens, so it does not fit with a prompt "
                             f"token in max_length={max_length}: {answer[:60]!r}")
        out.append((p[max(0, len(p) + len(a) - max_length):] + a, len(a)))
    return out


def _collate(seqs: Sequence[tuple[list[int], int]], pad_id: int, max_length: int,
             pad_to_multiple: int | None) -> Batch:
    longest = max(len(ids) for ids, _ in seqs)
    length = max_length if pad_to_multiple is None else min(max_length, -(-longest // pad_to_multiple) * pad_to_multiple)
    input_ids = np.full((len(seqs), length), pad_id, np.int32)
    attention_mask = np.zeros((len(seqs), length), np.int32)
    loss_mask = np.zeros((len(seqs), length - 1), np.float32)
    for row, (ids, n_answer) in enumerate(seqs):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, len(ids) - n_answer - 1:len(ids) - 1] = 1  # targets[t] = input_ids[t + 1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": input_ids[:, 1:],
            "loss_mask": loss_mask}


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches one pass over ``n`` pairs gives."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def make_batches(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *, batch_size: int, max_length: int,
                 shuffle: bool = True, seed: int = 0, epochs: int | None = 1, start_step: int = 0,
                 drop_last: bool = False, pad_to_multiple: int | None = 64, add_eos: bool = True) -> Iterator[Batch]:
    """Training batches of (prompt, answer) pairs; ``loss_mask`` is 1 on the answer tokens.

    Each sequence is ``encode(prompt) + encode(answer) + [eos if add_eos]``, cut from the left
    of the prompt to ``max_length``. Epoch ``e`` visits the pairs in the order
    ``np.random.default_rng((seed, e)).permutation(n)`` (in order without ``shuffle``); steps
    count across epochs, so ``start_step=k`` yields exactly what the full stream yields from
    its ``k``-th batch on (a resumed run sees the same data). ``epochs=None`` repeats forever.
    The sequence length is the longest in the batch rounded up to ``pad_to_multiple``, capped at
    ``max_length`` (always ``max_length`` if ``pad_to_multiple`` is None). The last batch of an
    epoch is smaller unless ``drop_last``.
    """
    seqs = _encode_pairs(pairs, tokenizer, max_length, add_eos)
    pad_id = special_ids(tokenizer)[1]
    per_epoch = steps_per_epoch(len(seqs), batch_size, drop_last)
    if per_epoch == 0:
        raise ValueError(f"{len(seqs)} pairs make no full batch of {batch_size} with drop_last=True")
    stop = None if epochs is None else epochs * per_epoch
    order, order_epoch = None, -1
    for step in itertools.islice(itertools.count(start_step), None if stop is None else max(0, stop - start_step)):
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:
            order = np.random.default_rng((seed, epoch)).permutation(len(seqs)) if shuffle else np.arange(len(seqs))
            order_epoch = epoch
        yield _collate([seqs[i] for i in order[pos * batch_size:(pos + 1) * batch_size]], pad_id, max_length,
                       pad_to_multiple)


def scoring_batches(examples: Sequence[Example], tokenizer: Tokenizer, *, batch_size: int, max_length: int,
                    pad_to_multiple: int | None = 64) -> Iterator[Batch]:
    """Multiple-choice scoring batches: one row per (example, choice), in order.

    A row is ``encode(prompt) + encode(TARGET_SEP + choice)`` (no eos) and its ``loss_mask``
    covers exactly the choice tokens, so ``sum(logprob * loss_mask)`` is the choice's
    log-likelihood and ``loss_mask.sum(-1)`` its token length. Besides the arrays of
    :func:`make_batches`, rows carry ``example`` and ``choice`` (int32 indices).
    """
    rows = [(e, c) for e, ex in enumerate(examples) for c in range(len(ex.choices))]
    seqs = _encode_pairs([(examples[e].prompt, TARGET_SEP + examples[e].choices[c]) for e, c in rows],
                         tokenizer, max_length, add_eos=False)
    pad_id = special_ids(tokenizer)[1]
    for start in range(0, len(rows), batch_size):
        batch = _collate(seqs[start:start + batch_size], pad_id, max_length, pad_to_multiple)
        index = np.asarray(rows[start:start + batch_size], np.int32)
        yield batch | {"example": index[:, 0], "choice": index[:, 1]}
