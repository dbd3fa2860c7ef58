r"""The thesis' seven commonsense tasks and the LLM-Adapters format: loading, prompts, batches.

Records keep their Hugging Face schemas and are read from local json / jsonl / parquet files
(or by hub name, where the hub is reachable). Each becomes an :class:`Example`: the prompt and
answer choices rendered with the PromptSource template the thesis used (the table below), and the
index of the correct choice. Bad records raise :class:`DataError` naming file, record and field;
nothing is skipped.

Templates (PromptSource ``templates.yaml`` rendered as PromptSource does: Jinja, split on
``|||``, both sides stripped). ``{…}`` are record fields; ``\n`` is a newline:

=============  ==============================  ==============================================  ================
task           template                        prompt                                          choices
=============  ==============================  ==============================================  ================
boolq          yes_no_question                 ``Text: {passage}\n\nAnswer the following        ``No``, ``Yes``
               (super_glue/boolq)              yes/no question: {question}? Yes or no?``       (label = answer)
piqa           what_is_the_correct_ending      ``Goal: {goal}\n\nWhich is the correct           sol1, sol2
                                               ending?\n- {sol1}\n- {sol2}\n\nAnswer:``
siqa           Show choices and generate       ``Context: {context}\n\nQuestion: {question}     ``A``, ``B``,
               index                           \n\nWhich one of these answers best answers      ``C``
                                               the question according to the context?\n\nA:
                                               {answerA}\n\nB: {answerB}\n\nC: {answerC}``
winogrande     underscore refer to             ``{sentence}\nWhat does the _ in the above       option1, option2
                                               sentence refer to? {option1} or {option2}?``
arc_easy       pick_the_most_correct_option    ``Pick the most correct option to answer the     ``A``, ``B``, …
                                               following question.\n\n{question}\n\n
                                               Options:\n\n- A: {text0}\n\n- B: {text1}…``
arc_challenge  qa_options                      ``{question}\n\nOptions:\n- {text0}\n- {text1}…``  the texts
obqa           which_correct                   ``{question_stem}\n\nWhich is the correct         the texts
                                               answer?\n- {text0}\n- {text1}…``
=============  ==============================  ==============================================  ================

Deviation: PromptSource's ``pick_the_most_correct_option`` hard-codes the letters A–D (zip
drops a fifth option, and records keyed "1".."4" get the target "1" for options shown as A–D);
here every option gets the letter of its position and the target is the letter at the
answerKey's position, which is the same for all records labelled A–D.

``template="harness"`` renders lm-evaluation-harness' prompts and choices instead (its
``acc`` / ``acc_norm`` are ``accuracy`` / ``accuracy_norm`` of :mod:`jpeft.eval`):

=============  ===================================================  ==========================
task           prompt                                               choices
=============  ===================================================  ==========================
boolq          ``{passage}\nQuestion: {question}?\nAnswer:``        ``no``, ``yes``
piqa           ``Question: {goal}\nAnswer:``                        sol1, sol2
siqa           ``Q: {context} {question}\nA:``                      answerA, answerB, answerC
winogrande     the sentence up to the blank, the option filling it  the rest of the sentence
               (one prompt per option: :attr:`Example.prompts`)     (the same for both)
arc_*          ``Question: {question}\nAnswer:``                    the texts
obqa           ``Question: {question_stem}\nAnswer:``               the texts
=============  ===================================================  ==========================

A model scores, and is trained on, ``ANSWER_PREFIX + choice`` appended to the prompt (the
PromptSource target follows the prompt after one space). LLM-Adapters records
(``commonsense_170k.json``) render with the Alpaca prompts :data:`ALPACA` /
:data:`ALPACA_INPUT` and their ``output`` is appended verbatim.

Batches are dicts of numpy arrays of shape (batch, width) (width: the batch's longest sequence rounded up to :data:`PAD_MULTIPLE`, at most ``max_length``), right-padded with the pad id
(EOS where the tokenizer has none): ``input_ids``, ``attention_mask`` (int32), ``targets``
(int32, ``targets[:, t] = input_ids[:, t + 1]``, last column and padding = pad id) and
``loss_mask`` (float32, aligned with ``targets``: 1 exactly where the target is an answer token
or the EOS closing it).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import re
import string
from typing import Callable, Iterator, Sequence

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
TEMPLATES = {
    "boolq": "yes_no_question",
    "piqa": "what_is_the_correct_ending",
    "siqa": "Show choices and generate index",
    "winogrande": "underscore refer to",
    "arc_easy": "pick_the_most_correct_option",
    "arc_challenge": "qa_options",
    "obqa": "which_correct",
}
ANSWER_PREFIX = " "
"""Put between a prompt and the choice a model scores or is trained on."""
ASSETS = pathlib.Path(__file__).parent / "assets"
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")  # looked up in a raw tokenizers.Tokenizer

PathLike = str | os.PathLike


class DataError(ValueError):
    """A record (or file) that cannot be used; the message names the file, record and field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered record: the model scores ``prompt + answer_prefix + choice`` per choice.

    ``prompts``, where given, is one prompt per choice instead (lm-evaluation-harness'
    WinoGrande: the option fills the blank in the context, the rest of the sentence is scored).
    ``answer_prefix`` is :data:`ANSWER_PREFIX` for the tasks' templates and empty for
    LLM-Adapters records, whose Alpaca prompt ends in a newline."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    task: str
    source: str  # "file:record_index"
    prompts: tuple[str, ...] | None = None
    answer_prefix: str = ANSWER_PREFIX

    def prompt_for(self, choice: int) -> str:
        """The prompt that choice ``choice`` follows."""
        return self.prompt if self.prompts is None else self.prompts[choice]


# ----------------------------------------------------------------------- templates


def _field(r: dict, name: str, where: str):
    if r.get(name) is None:
        raise DataError(f"{where}: missing field {name!r} (fields: {sorted(r)})")
    return r[name]


def _text(r: dict, name: str, where: str) -> str:
    value = _field(r, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} = {value!r} is not a string")
    return value


def _index(r: dict, name: str, n: int, where: str, base: int = 0) -> int:
    """Field ``name`` as a choice index in [0, n) (stored as ``base``-based int or digit string)."""
    value = _field(r, name, where)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        k = int(value) - base
    except ValueError:
        raise DataError(f"{where}: field {name!r} = {value!r} is not a valid label") from None
    if not 0 <= k < n:
        raise DataError(f"{where}: field {name!r} = {value!r} is out of range for {n} choices")
    return k


def _keyed_choices(r: dict, where: str) -> tuple[list[str], list[str], int]:
    """(texts, labels, index of answerKey) of an ARC / OpenBookQA record."""
    choices = _field(r, "choices", where)
    texts, labels = (choices.get("text"), choices.get("label")) if isinstance(choices, dict) else (None, None)
    if not texts:
        raise DataError(f"{where}: field 'choices' has no choices: {choices!r}")
    if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels)
            and all(isinstance(x, str) for x in texts + labels)):
        raise DataError(f"{where}: field 'choices' needs equally long string lists 'text' and 'label': {choices!r}")
    key = _field(r, "answerKey", where)
    if key not in labels:
        raise DataError(f"{where}: field 'answerKey' = {key!r} is not one of the choice labels {labels}")
    return texts, labels, labels.index(key)


Rendered = tuple[str, tuple[str, ...], int]


def _boolq(r: dict, w: str) -> Rendered:
    answer = _field(r, "answer", w)
    if not isinstance(answer, bool):
        raise DataError(f"{w}: field 'answer' = {answer!r} is not a bool")
    prompt = f"Text: {_text(r, 'passage', w)}\n\nAnswer the following yes/no question: {_text(r, 'question', w)}? Yes or no?"
    return prompt, ("No", "Yes"), int(answer)


def _piqa(r: dict, w: str) -> Rendered:
    sol1, sol2 = _text(r, "sol1", w), _text(r, "sol2", w)
    prompt = f"Goal: {_text(r, 'goal', w)}\n\nWhich is the correct ending?\n- {sol1}\n- {sol2}\n\nAnswer:"
    return prompt, (sol1, sol2), _index(r, "label", 2, w)


def _siqa(r: dict, w: str) -> Rendered:
    options = "\n\n".join(f"{c}: {_text(r, f'answer{c}', w)}" for c in "ABC")
    prompt = (
        f"Context: {_text(r, 'context', w)}\n\nQuestion: {_text(r, 'question', w)}\n\n"
        f"Which one of these answers best answers the question according to the context?\n\n{options}"
    )
    return prompt, ("A", "B", "C"), _index(r, "label", 3, w, base=1)


def _winogrande(r: dict, w: str) -> Rendered:
    sentence, option1, option2 = _text(r, "sentence", w), _text(r, "option1", w), _text(r, "option2", w)
    if "_" not in sentence:
        raise DataError(f"{w}: field 'sentence' has no '_' blank: {sentence!r}")
    prompt = f"{sentence}\nWhat does the _ in the above sentence refer to? {option1} or {option2}?"
    return prompt, (option1, option2), _index(r, "answer", 2, w, base=1)


def _arc_easy(r: dict, w: str) -> Rendered:
    texts, _, label = _keyed_choices(r, w)
    letters = tuple(string.ascii_uppercase[: len(texts)])
    options = "".join(f"\n\n- {letter}: {t}" for letter, t in zip(letters, texts))
    prompt = f"Pick the most correct option to answer the following question.\n\n{_text(r, 'question', w)}\n\nOptions:{options}"
    return prompt, letters, label


def _arc_challenge(r: dict, w: str) -> Rendered:
    texts, _, label = _keyed_choices(r, w)
    return f"{_text(r, 'question', w)}\n\nOptions:\n- " + "\n- ".join(texts), tuple(texts), label


def _obqa(r: dict, w: str) -> Rendered:
    texts, _, label = _keyed_choices(r, w)
    return f"{_text(r, 'question_stem', w)}\n\nWhich is the correct answer?\n- " + "\n- ".join(texts), tuple(texts), label


# lm-evaluation-harness' task configurations (its ``doc_to_text`` / ``doc_to_choice``; the
# continuation follows the context after one space, its ``target_delimiter``)


def _harness_boolq(r: dict, w: str) -> Rendered:
    _, _, label = _boolq(r, w)
    return f"{_text(r, 'passage', w)}\nQuestion: {_text(r, 'question', w)}?\nAnswer:", ("no", "yes"), label


def _harness_piqa(r: dict, w: str) -> Rendered:
    return f"Question: {_text(r, 'goal', w)}\nAnswer:", (_text(r, "sol1", w), _text(r, "sol2", w)), _index(r, "label", 2, w)


def _harness_siqa(r: dict, w: str) -> Rendered:
    choices = tuple(_text(r, f"answer{c}", w) for c in "ABC")
    return f"Q: {_text(r, 'context', w)} {_text(r, 'question', w)}\nA:", choices, _index(r, "label", 3, w, base=1)


def _harness_winogrande(r: dict, w: str) -> tuple[str, tuple[str, ...], int, tuple[str, str]]:
    """Partial scoring: each option fills the blank of the context before it; the sentence after
    the blank is the continuation both contexts score."""
    sentence, options = _text(r, "sentence", w), (_text(r, "option1", w), _text(r, "option2", w))
    if "_" not in sentence:
        raise DataError(f"{w}: field 'sentence' has no '_' blank: {sentence!r}")
    blank = sentence.index("_")
    rest = sentence[blank + 1:].strip()
    contexts = tuple(sentence[:blank] + option for option in options)
    return contexts[0], (rest, rest), _index(r, "answer", 2, w, base=1), contexts


def _harness_qa(question_field: str) -> Callable[[dict, str], Rendered]:
    def render(r: dict, w: str) -> Rendered:
        texts, _, label = _keyed_choices(r, w)
        return f"Question: {_text(r, question_field, w)}\nAnswer:", tuple(texts), label

    return render


#: template set -> task -> renderer (record, where) -> (prompt, choices, label[, per-choice prompts])
RENDERERS: dict[str, dict[str, Callable]] = {
    "promptsource": {
        "boolq": _boolq, "piqa": _piqa, "siqa": _siqa, "winogrande": _winogrande,
        "arc_easy": _arc_easy, "arc_challenge": _arc_challenge, "obqa": _obqa,
    },
    "harness": {
        "boolq": _harness_boolq, "piqa": _harness_piqa, "siqa": _harness_siqa, "winogrande": _harness_winogrande,
        "arc_easy": _harness_qa("question"), "arc_challenge": _harness_qa("question"), "obqa": _harness_qa("question_stem"),
    },
}
TEMPLATE_SETS = tuple(RENDERERS)


# ------------------------------------------------------------------------- loading


def _json_lines(text: str, path: str) -> list:
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: invalid JSON ({e})") from None
    return records


def read_records(path: PathLike) -> list[dict]:
    """The records of one file: ``.jsonl``, ``.json`` (an array, ``{"data": [...]}`` or JSON
    lines), either gzip-compressed (``.gz``), or ``.parquet``. An empty file or a record that
    is not an object is a DataError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif path.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        raw = pathlib.Path(path).read_bytes()
        text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8")
        try:
            records = json.loads(text) if path.endswith((".json", ".json.gz")) else _json_lines(text, path)
        except json.JSONDecodeError:  # a .json file holding JSON lines (or nothing), as `datasets` accepts
            records = _json_lines(text, path)
        if isinstance(records, dict):
            if not isinstance(records.get("data"), list):
                raise DataError(f"{path}: a JSON object file needs a 'data' list of records")
            records = records["data"]
    else:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, either with .gz, or .parquet)")
    if not records:
        raise DataError(f"{path}: the file holds no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i}: a record must be an object, got {type(r).__name__}")
    return records


def _hub_records(name: str, split: str) -> tuple[list[dict], str]:
    hub, subset = HUB_NAMES[name]
    try:
        import datasets

        return list(datasets.load_dataset(hub, subset, split=split)), f"{hub}/{subset or 'default'}/{split}"
    except Exception as e:  # noqa: BLE001 - whatever failed, the way out is a local file
        raise RuntimeError(
            f"could not load {hub} ({subset or 'default'}, {split}) with datasets.load_dataset: {e}. "
            f"Pass path= a local .jsonl/.json/.parquet file with the dataset's fields, e.g. {sample_path(name, 'train')}"
        ) from e


def load_task(name: str, split: str = "train", *, path: PathLike | Sequence[PathLike] | None = None,
              limit: int | None = None, template: str = "promptsource") -> list[Example]:
    """The examples of task ``name`` (one of :data:`TASKS`), rendered with its template of
    ``template`` (:data:`TEMPLATE_SETS`: ``promptsource``, the thesis' PromptSource templates,
    or ``harness``, lm-evaluation-harness' prompts and choices).

    ``path``: local file(s) with the Hugging Face dataset's fields (``split`` is then only a
    label); without it the dataset is loaded from the hub by name. ``limit`` keeps the first
    ``limit`` records. ``Example.source`` is ``"file:record_index"``.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if template not in RENDERERS:
        raise ValueError(f"unknown template {template!r}; templates: {', '.join(TEMPLATE_SETS)}")
    if path is None:
        records, origin = _hub_records(name, split)
        sources = [(origin, i, r) for i, r in enumerate(records)]
    else:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        sources = [(os.fspath(p), i, r) for p in paths for i, r in enumerate(read_records(p))]
    examples = []
    for origin, i, r in sources[:limit]:
        prompt, choices, label, *prompts = RENDERERS[template][name](r, f"{origin}: record {i}")
        examples.append(Example(prompt, choices, label, name, f"{origin}:{i}", *prompts))
    return examples


def sample_path(task: str, split: str) -> pathlib.Path:
    """The bundled sample file of ``task`` for ``split`` (only ``train`` and ``validation`` exist)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return ASSETS / "sample_data" / task / f"{split}.jsonl"


FORMAT_LINE = re.compile(r"Answer format:\s*(\S.*?)\s*$", re.MULTILINE)
"""The line of an LLM-Adapters instruction that lists its answers: ``Answer format: a/b/...``."""
ANSWER_TEMPLATE = "the correct answer is {}"
"""An LLM-Adapters response (the ``output`` its training records teach)."""


def _instruction_prompt(r: dict, where: str) -> str:
    instruction, text = _text(r, "instruction", where), r.get("input") or ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'input' = {text!r} is not a string")
    return ALPACA_INPUT.format(instruction=instruction, input=text) if text else ALPACA.format(instruction=instruction)


def load_instructions(path: PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, target) pairs of an LLM-Adapters file (``commonsense_170k.json`` records with
    instruction, input, output, answer): the Alpaca prompt, and ``output`` as the target."""
    pairs = []
    for i, r in enumerate(read_records(path)[:limit]):
        where = f"{os.fspath(path)}: record {i}"
        output = _text(r, "output", where)
        _text(r, "answer", where)
        pairs.append((_instruction_prompt(r, where), output))
    return pairs


def load_instruction_examples(path: PathLike, limit: int | None = None) -> list[Example]:
    """An LLM-Adapters file as multiple-choice examples (Hu et al., 2023, "LLM-Adapters").

    The choices are the answers of the instruction's ``Answer format: a/b/...`` line
    (answer1…answer5, true/false, solution1/2, option1/2, ending1…4), each scored as the
    response ``"the correct answer is <choice>"`` right after the Alpaca prompt; the label is
    the record's ``answer``. A record without a format line, or whose answer is not among its
    choices, is a DataError naming the file, the record and the field.
    """
    examples = []
    name = pathlib.Path(path).stem
    for i, r in enumerate(read_records(path)[:limit]):
        where = f"{os.fspath(path)}: record {i}"
        found = FORMAT_LINE.findall(_text(r, "instruction", where))
        if not found:
            raise DataError(f"{where}: field 'instruction' has no 'Answer format: a/b/...' line")
        answers = tuple(a.strip() for a in found[-1].split("/"))
        if len(answers) < 2 or not all(answers):
            raise DataError(f"{where}: field 'instruction': the answer format {found[-1]!r} lists fewer than two answers")
        answer = _text(r, "answer", where).strip()
        if answer not in answers:
            raise DataError(f"{where}: field 'answer' = {answer!r} is not one of the format's {list(answers)}")
        examples.append(Example(_instruction_prompt(r, where), tuple(ANSWER_TEMPLATE.format(a) for a in answers),
                                answers.index(answer), name, f"{os.fspath(path)}:{i}", answer_prefix=""))
    if not examples:
        raise DataError(f"{os.fspath(path)}: no records")
    return examples


def extract_answer(text: str, choices: Sequence[str]) -> str | None:
    """The first of ``choices`` that ``text`` names, as LLM-Adapters' evaluation reads a
    generated response (``re.findall`` of the task's answer words, the first match), or None."""
    found = re.search("|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True)), text)
    return found.group(0) if found else None


HOLDOUT_SEED = 20241202
"""The seed of :func:`holdout`'s permutation: fixed, so every run holds out the same records."""


def holdout(examples: Sequence[Example], n: int) -> tuple[list[Example], list[Example]]:
    """``(rest, held_out)``: ``n`` examples drawn by a permutation seeded with
    :data:`HOLDOUT_SEED` (in their original order), and the others, never to be trained on.
    For sets without a validation split (the LLM-Adapters training files)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < len(examples):
        raise ValueError(f"holdout must be an integer in [1, {len(examples) - 1}] for {len(examples)} examples, got {n!r}")
    held = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(examples))[:n].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def training_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """(prompt, answer prefix + correct choice) per example, for :func:`encode_pairs`."""
    return [(ex.prompt_for(ex.label), ex.answer_prefix + ex.choices[ex.label]) for ex in examples]


# ---------------------------------------------------------------------- tokenizing


def default_tokenizer():
    """The bundled byte-level BPE (1024 tokens; ``<|endoftext|>`` = 0 is bos, eos and pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer" / "tokenizer.json"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def _is_raw(tokenizer) -> bool:
    import tokenizers

    return isinstance(tokenizer, tokenizers.Tokenizer)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batched call."""
    if not texts:
        return []
    if _is_raw(tokenizer):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos id, pad id) of a Hugging Face or raw ``tokenizers`` tokenizer; pad falls back to eos."""
    if _is_raw(tokenizer):
        eos = next((i for i in map(tokenizer.token_to_id, EOS_TOKENS) if i is not None), None)
        pad = (tokenizer.padding or {}).get("pad_id")
    else:
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ValueError(f"the tokenizer has no EOS token (a raw tokenizer needs one of {EOS_TOKENS})")
    return eos, eos if pad is None else pad


@dataclasses.dataclass(frozen=True)
class EncodedPairs:
    """Tokenized prompt + answer sequences, padded only when batched by :func:`collate`."""

    sequences: tuple[tuple[int, ...], ...]
    answer_starts: tuple[int, ...]  # index of the first answer token in each sequence
    max_length: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.sequences)


def _join(prompt: list[int], answer: list[int], max_length: int, where: str) -> tuple[tuple[int, ...], int]:
    """Prompt + answer, cutting the prompt on the left to fit; at least one prompt token stays
    so that the first answer token is a target."""
    if len(answer) > max_length - 1:
        raise DataError(f"{where}: the answer has {len(answer)} tokens, max_length={max_length} leaves room for {max_length - 1}")
    if not prompt:
        raise DataError(f"{where}: the prompt has no tokens")
    prompt = prompt[max(0, len(prompt) + len(answer) - max_length):]
    return tuple(prompt + answer), len(prompt)


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int, *, add_eos: bool = True) -> EncodedPairs:
    """Tokenize each (prompt, answer) once: prompt tokens + answer tokens (+ EOS). The answer is
    used verbatim (:func:`training_pairs` already prefixes it). Too long: the prompt is cut on
    the left; an answer that cannot fit raises DataError."""
    eos, pad = special_ids(tokenizer)
    prompts = token_ids(tokenizer, [p for p, _ in pairs])
    answers = token_ids(tokenizer, [a for _, a in pairs])
    joined = [_join(p, a + [eos] * add_eos, max_length, f"pair {i}") for i, (p, a) in enumerate(zip(prompts, answers))]
    return EncodedPairs(tuple(s for s, _ in joined), tuple(k for _, k in joined), max_length, pad)


PAD_MULTIPLE = 32
"""A batch is padded to its longest sequence rounded up to a multiple of this (at most
``max_length``): a few shapes (each compiles the step once), and no step pays for padding up
to a ``max_length`` its rows do not reach."""


def collate(encoded: EncodedPairs, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The right-padded batch of the given rows (fields: see the module docstring), its
    width :data:`PAD_MULTIPLE`-rounded."""
    n = len(rows)
    length = min(encoded.max_length, _bucket(max(len(encoded.sequences[r]) for r in rows), PAD_MULTIPLE))
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
    """Number of batches :func:`batches` yields for ``n`` sequences."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(encoded: EncodedPairs, *, batch_size: int, seed: int, epoch: int = 0, start: int = 0,
            shuffle: bool = True, drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch in an order fixed by ``(seed, epoch)``. ``start`` skips the
    first ``start`` batches, so a resumed run continues its data stream exactly. Without
    ``drop_last`` the last batch may have fewer rows."""
    order = np.random.default_rng([seed, epoch]).permutation(len(encoded)) if shuffle else np.arange(len(encoded))
    for step in range(start, steps_per_epoch(len(encoded), batch_size, drop_last)):
        yield collate(encoded, order[step * batch_size : (step + 1) * batch_size].tolist())


def choice_batches(examples: Sequence[Example], tokenizer, *, batch_size: int, max_length: int) -> Iterator[dict[str, np.ndarray]]:
    """Scoring batches: one row per (example, choice), ``prompt + ANSWER_PREFIX + choice`` with
    ``loss_mask`` exactly on the choice tokens (no EOS).

    Extra int32 fields: ``example_index``, ``choice_index`` and ``choice_chars`` (the choice's
    length in characters, for length-normalized accuracy). The last batch is filled up to
    ``batch_size`` with rows whose ``example_index`` and ``choice_index`` are -1 (copies of its
    first row's tokens with ``loss_mask`` 0), so every batch has the same shape.
    """
    pad = special_ids(tokenizer)[1]
    owners = [(e, c, len(choice)) for e, ex in enumerate(examples) for c, choice in enumerate(ex.choices)]
    prompts = token_ids(tokenizer, [examples[e].prompt_for(c) for e, c, _ in owners])
    answers = token_ids(tokenizer, [examples[e].answer_prefix + examples[e].choices[c] for e, c, _ in owners])
    # a prompt too long is cut to leave room for the longest choice that follows it, as
    # prompt_batches cuts the prompt it reads once: both paths score the same tokens
    longest: dict[tuple[int, str], int] = {}
    for (e, c, _), a in zip(owners, answers):
        key = (e, examples[e].prompt_for(c))
        longest[key] = max(longest.get(key, 0), len(a))
    joined = [_join(p[min(len(p) - 1, max(0, len(p) + longest[e, examples[e].prompt_for(c)] - max_length)):], a,
                    max_length, f"{examples[e].source}, choice {c}")
              for (e, c, _), p, a in zip(owners, prompts, answers)]
    encoded = EncodedPairs(tuple(s for s, _ in joined), tuple(k for _, k in joined), max_length, pad)
    for first in range(0, len(owners), batch_size):
        rows = list(range(first, min(first + batch_size, len(owners))))
        fill = batch_size - len(rows)
        batch = collate(encoded, rows + [rows[0]] * fill)
        batch["loss_mask"][len(rows):] = 0
        meta = np.array([owners[r] for r in rows] + [(-1, -1, 0)] * fill, np.int32).reshape(-1, 3)
        batch.update(example_index=meta[:, 0], choice_index=meta[:, 1], choice_chars=meta[:, 2])
        yield batch


def _bucket(n: int, step: int) -> int:
    return -(-n // step) * step


def prompt_batches(examples: Sequence[Example], tokenizer, *, batch_size: int,
                   max_length: int) -> Iterator[dict[str, np.ndarray]]:
    """Scoring batches that read each prompt once: one row per (example, distinct prompt), the
    prompt left-padded (its last token at the end) and the continuations ``ANSWER_PREFIX +
    choice`` of every choice that follows it, right-padded, beside it.

    Fields: ``prompt_ids``/``prompt_mask`` (batch, P), ``choice_ids``/``choice_mask`` (batch, K,
    C), and int32 ``example_index`` (batch,), ``choice_index`` and ``choice_chars`` (batch, K),
    -1 / 0 where a row has fewer than K choices or is filling the last batch. K and C are the
    set's; rows go in order of prompt length and P is each batch's longest prompt rounded up to
    a multiple of 32 (a few shapes, so a few compiles, and short prompts are not padded to
    the longest of the set). A prompt that does not fit ``max_length`` with its longest choice
    keeps its last tokens (as :func:`choice_batches` cuts it, so both score the same tokens),
    and a choice that cannot fit ``max_length`` with one prompt token is a DataError naming it.
    """
    pad = special_ids(tokenizer)[1]
    groups: list[tuple[int, str, list[int]]] = []  # (example, prompt, its choices)
    for e, ex in enumerate(examples):
        by_prompt: dict[str, list[int]] = {}
        for c in range(len(ex.choices)):
            by_prompt.setdefault(ex.prompt_for(c), []).append(c)
        groups += [(e, p, cs) for p, cs in by_prompt.items()]
    prompts = token_ids(tokenizer, [p for _, p, _ in groups])
    answers = token_ids(tokenizer, [ex.answer_prefix + ex.choices[c] for ex in examples for c in range(len(ex.choices))])
    offsets = np.cumsum([0] + [len(ex.choices) for ex in examples])
    answer_of = lambda e, c: answers[offsets[e] + c]  # noqa: E731
    longest = max(len(answer_of(e, c)) for e, _, cs in groups for c in cs)
    if longest + 1 > max_length:
        e, c = next((e, c) for e, _, cs in groups for c in cs if len(answer_of(e, c)) == longest)
        raise DataError(f"{examples[e].source}, choice {c}: the choice is {longest} tokens, which with a prompt "
                        f"do not fit max_length {max_length}")
    width = min(_bucket(longest, 8), max_length - 1)
    k = max(len(cs) for _, _, cs in groups)
    # each prompt keeps its last tokens that fit max_length with its own longest choice
    prompts = [p[max(0, len(p) + max(len(answer_of(e, c)) for c in cs) - max_length):]
               for p, (e, _, cs) in zip(prompts, groups)]
    order = sorted(range(len(groups)), key=lambda g: len(prompts[g]))
    for first in range(0, len(groups), batch_size):
        members = order[first:first + batch_size]
        rows = [groups[g] for g in members]
        plen = min(_bucket(max(len(prompts[g]) for g in members), PAD_MULTIPLE), max_length)
        batch = {"prompt_ids": np.full((batch_size, plen), pad, np.int32), "prompt_mask": np.zeros((batch_size, plen), np.int32),
                 "choice_ids": np.full((batch_size, k, width), pad, np.int32),
                 "choice_mask": np.zeros((batch_size, k, width), np.int32),
                 "example_index": np.full((batch_size,), -1, np.int32), "choice_index": np.full((batch_size, k), -1, np.int32),
                 "choice_chars": np.zeros((batch_size, k), np.int32)}
        for b, (e, _, cs) in enumerate(rows):
            tokens = prompts[members[b]]
            batch["prompt_ids"][b, plen - len(tokens):] = tokens
            batch["prompt_mask"][b, plen - len(tokens):] = 1
            batch["example_index"][b] = e
            for j, c in enumerate(cs):
                a = answer_of(e, c)
                batch["choice_ids"][b, j, :len(a)] = a
                batch["choice_mask"][b, j, :len(a)] = 1
                batch["choice_index"][b, j] = c
                batch["choice_chars"][b, j] = len(examples[e].choices[c])
        for b in range(len(rows), batch_size):  # filler rows: the first row's prompt, nothing scored
            batch["prompt_ids"][b], batch["prompt_mask"][b] = batch["prompt_ids"][0], batch["prompt_mask"][0]
        yield batch
