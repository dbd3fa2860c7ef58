"""Train the bundled demo tokenizer: byte-level BPE, 1024 tokens, ``<|endoftext|>`` = 0.

Run ``PYTHONPATH=. python jpeft/assets/make_tokenizer.py`` from the repository root; the corpus is the bundled sample data
rendered through the task templates, so the result is reproducible offline.
"""

import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jpeft import data


def corpus():
    for task in data.TASKS:
        for split in ("train", "validation"):
            for ex in data.load_task(task, split, path=data.sample_path(task, split)):
                yield ex.prompt + "".join(data.ANSWER_PREFIX + c for c in ex.choices)
    for prompt, target in data.load_instructions(data.ASSETS / "sample_data" / "commonsense_mini.json"):
        yield prompt + target


if __name__ == "__main__":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    out = pathlib.Path(__file__).parent / "tokenizer" / "tokenizer.json"
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")
