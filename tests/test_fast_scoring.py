"""Scoring each prompt once (its key/value cache serves every choice) equals one forward per choice."""

import jax
import numpy as np
import pytest
import transformers

import jpeft
from jpeft import data, eval as evaluation
from jpeft.models import layers, llama, phi
from conftest import perturb


@pytest.fixture(scope="module")
def tok():
    return data.default_tokenizer()


@pytest.fixture(scope="module", params=["phi", "llama"])
def port(request):
    if request.param == "phi":
        return phi.init(phi.config("tiny"), jax.random.key(0))
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    return llama.init(cfg, jax.random.key(0))


# a prompt shared by the choices, one prompt per choice (the harness' WinoGrande), the thesis'
# PromptSource template, and LLM-Adapters records (no answer prefix, choices differing at their end)
CASES = [("arc_easy", "harness"), ("winogrande", "harness"), ("obqa", "promptsource"), ("instructions", None)]
MINI = data.ASSETS / "sample_data" / "commonsense_mini.json"


def examples_of(task, template):
    if task == "instructions":
        return data.load_instruction_examples(MINI)[::6]
    return data.load_task(task, "validation", path=data.sample_path(task, "validation"), template=template)[:6]
METHODS = {"base": None, "lora": dict(r=4), "prompt_tuning": dict(num_virtual_tokens=3),
           "prefix_tuning": dict(num_virtual_tokens=3), "loreft": dict(rank=2)}
ON_LLAMA = ("base", "prefix_tuning")  # the rest runs through the same shared layers: Phi shows it


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_scores_equal_per_choice_scores(port, tok, method):
    model, params = port
    if isinstance(model, llama.LlamaForCausalLM) and method not in ON_LLAMA:
        pytest.skip("the shared layers are the Phi case's; the Llama port is checked on the base and its GQA prefix")
    if METHODS[method] is not None:
        targets = jpeft.core.targets_for(method, None, model)
        params = perturb(jpeft.apply(params, method, key=jax.random.key(1), **targets, **METHODS[method]),
                         jax.random.key(2), 0.05)
    for task, template in CASES:
        examples = examples_of(task, template)
        results = [evaluation.evaluate(model, params, examples, tok, batch_size=4, max_length=192, cached=cached)
                   for cached in (False, True)]
        slow, fast = (np.concatenate([p["scores"] for p in r["predictions"]]) for r in results)
        assert np.abs(fast - slow).max() <= 1e-4 * np.abs(slow).max(), (task, template)
        assert results[0]["accuracy"] == results[1]["accuracy"]


def test_generation_protocol_reads_each_row_as_if_alone(tok):
    """evaluate_generate pads a batch on the left and fills its last batch: each response must
    equal the greedy continuation of that prompt run alone."""
    model, params = phi.init(phi.config("tiny"), jax.random.key(0))
    examples = data.load_instruction_examples(MINI)[:5]
    result = evaluation.evaluate_generate(model, params, examples, tok, batch_size=2, max_length=192, max_new_tokens=6)
    eos, pad = data.special_ids(tok)
    for ex, g in zip(examples, result["generations"]):
        ids = np.asarray([data.token_ids(tok, [ex.prompt])[0]], np.int32)
        out = np.asarray(layers.generate(model, params, ids, max_new_tokens=6, eos_token_id=eos))[0, ids.shape[1]:].tolist()
        alone = tok.decode(out[:out.index(eos)] if eos in out else out)
        assert g["response"] == alone and g["source"] == ex.source
        assert g["answer"] == data.extract_answer(alone, [c.removeprefix("the correct answer is ") for c in ex.choices])
    assert result["accuracy_generate"] == np.mean([g["answer"] == g["label"] for g in result["generations"]])


def test_a_choice_that_cannot_fit_is_refused(tok):
    (ex,) = data.load_task("piqa", "validation", path=data.sample_path("piqa", "validation"), template="harness")[:1]
    with pytest.raises(data.DataError, match=r"choice \d: the choice is \d+ tokens, which with a prompt do not fit "
                                             r"max_length 4"):
        list(data.prompt_batches([ex], tok, batch_size=2, max_length=4))


def test_prompts_too_long_are_cut_alike_on_both_paths(tok):
    """At a max_length some prompts do not fit with their choices: both paths keep the same
    last tokens of each (room for its longest choice), so the scores stay equal."""
    model, params = phi.init(phi.config("tiny"), jax.random.key(0))
    examples = examples_of("arc_easy", "harness")
    lengths = [len(p) for p in data.token_ids(tok, [ex.prompt for ex in examples])]
    max_length = int(np.median(lengths)) + 4
    batches = list(data.prompt_batches(examples, tok, batch_size=4, max_length=max_length))
    assert max(b["prompt_mask"].sum(1).max() for b in batches) < max(lengths)  # some prompt was cut
    results = [evaluation.evaluate(model, params, examples, tok, batch_size=4, max_length=max_length, cached=cached)
               for cached in (False, True)]
    slow, fast = (np.concatenate([p["scores"] for p in r["predictions"]]) for r in results)
    assert np.abs(fast - slow).max() <= 1e-4 * np.abs(slow).max()
