"""Train the bundled demo tokenizer: byte-level BPE, 1024 tokens, ``<|endoftext|>`` = id 0.

Run ``python -m jpeft.assets.make_tokenizer`` from the repository root (offline, deterministic): the corpus is the
bundled sample data rendered through the task templates (prompt + every scored choice) and
the LLM-Adapters sample, so the common template words become single tokens.
"""

import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jpeft import data

VOCAB_SIZE = 1024
EOS = "<|endoftext|>"
OUT = pathlib.Path(__file__).parent / "tokenizer" / "tokenizer.json"


def corpus():
    for task in data.TASKS:
        for split in ("train", "validation"):
            for ex in data.load_task(task, split, path=data.sample_path(task, split)):
                yield ex.prompt + "".join(data.ANSWER_PREFIX + c for c in ex.choices)
    for prompt, target in data.load_instructions(data.ASSETS / "sample_data" / "commonsense_mini.json"):
        yield prompt + target


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id(EOS) == 0, tok.get_vocab_size()
    return tok


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    train().save(str(OUT))
    print(f"wrote {OUT} ({VOCAB_SIZE} tokens, {OUT.stat().st_size} bytes)")
