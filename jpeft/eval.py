"""Multiple-choice evaluation by answer log-likelihood (the thesis' accuracy metric).

Each (example, choice) row is ``prompt + " " + choice``; its score is the summed
log-probability of the choice tokens given the prompt. ``accuracy`` takes the arg-max of
the sums, ``accuracy_norm`` of the sums divided by the choice's character length (the
``acc_norm`` of lm-evaluation-harness). Rows are scored in fixed-shape, jitted batches.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jpeft import data, hooks as jhooks, sharding, train

PyTree = Any


def make_score_fn(model) -> Callable:
    """A jitted ``(params, batch) -> (logp_sum, tokens)`` per row of a choice batch."""

    def score(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                             prompt_mask=train.prompt_mask(batch))
        token_logp = train.target_logprobs(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(token_logp * mask, axis=-1), jnp.sum(mask, axis=-1)

    return jax.jit(score)


def make_cached_score_fn(model) -> Callable:
    """A jitted ``(params, batch) -> logp_sum`` (batch, K) of a :func:`jpeft.data.prompt_batches`
    batch: the prompt runs once into a key/value cache, and each choice's continuation runs
    from that cache (``start=False``), so an example costs about one forward of its prompt
    instead of one per choice. The sums equal :func:`make_score_fn`'s (tested)."""
    from jpeft.models import layers

    def score(params, batch):
        prompt, choices, choice_mask = batch["prompt_ids"], batch["choice_ids"], batch["choice_mask"]
        virtual = jhooks.num_virtual_tokens(jhooks.split(params)[1])
        cache = layers.init_cache(model, prompt.shape[0], virtual + prompt.shape[1] + choices.shape[2])
        logits, cache = model.apply({"params": params}, prompt, batch["prompt_mask"], cache=cache, start=True)
        first = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))  # predicts each choice's first token

        def one_choice(ids_mask):
            ids, mask = ids_mask
            out, _ = model.apply({"params": params}, ids, mask, cache=cache, start=False)
            later = train.target_logprobs(out[:, :-1], ids[:, 1:])  # token t + 1 given the tokens up to t
            head = jnp.take_along_axis(first, ids[:, :1], axis=-1)
            return jnp.sum(jnp.concatenate([head, later], axis=1) * mask, axis=-1)

        return jax.lax.map(one_choice, (jnp.swapaxes(choices, 0, 1), jnp.swapaxes(choice_mask, 0, 1))).T

    return jax.jit(score)


def evaluate(
    model,
    params: PyTree,
    examples: Sequence[data.Example],
    tokenizer,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    score_fn: Callable | None = None,
    cached: bool = True,
    progress: bool = False,
) -> dict:
    """Accuracy and length-normalized accuracy of ``params`` on ``examples``.

    ``params`` may hold jpeft nodes (the model runs their factored path) or plain arrays.
    ``cached`` (default): read each prompt once and score every choice from its key/value
    cache (:func:`make_cached_score_fn`; ``score_fn``, if given, must be one), else one row
    per choice (:func:`make_score_fn`); the scores are equal (tested).
    Returns ``{"accuracy", "accuracy_norm", "n", "predictions"}`` where ``predictions``
    lists, per example, the chosen index, the label and the per-choice scores.
    """
    if not examples:
        raise ValueError("evaluate: no examples")
    scores = [np.full(len(ex.choices), np.nan) for ex in examples]
    if cached:
        score_fn = score_fn or make_cached_score_fn(model)
        batches = data.prompt_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length)
        rows = sum(len({ex.prompt_for(c) for c in range(len(ex.choices))}) for ex in examples)
        for batch in tqdm(batches, desc="score", unit="batch", total=-(-rows // batch_size), disable=not progress):
            arrays = {k: np.asarray(batch[k]) for k in ("prompt_ids", "prompt_mask", "choice_ids", "choice_mask")}
            logp = sharding.host_array(score_fn(params, arrays))
            for e, cs, row in zip(batch["example_index"], batch["choice_index"], logp):
                for c, s in zip(cs, row):
                    if e >= 0 and c >= 0:
                        scores[e][c] = s
    else:
        score_fn = score_fn or make_score_fn(model)
        batches = data.choice_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length)
        for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
            # host arrays: the same on every process, so a base split over several hosts takes them
            arrays = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "targets", "loss_mask")}
            logp, _ = score_fn(params, arrays)
            for e, c, s in zip(batch["example_index"], batch["choice_index"], sharding.host_array(logp)):
                if e >= 0:
                    scores[e][c] = s
    predictions, correct, correct_norm = [], 0, 0
    for ex, s in zip(examples, scores):
        if np.isnan(s).any():
            raise RuntimeError(f"evaluate: example {ex.source} was not scored for every choice")
        norm = s / np.array([max(len(c), 1) for c in ex.choices])
        pred, pred_norm = int(np.argmax(s)), int(np.argmax(norm))
        correct += pred == ex.label
        correct_norm += pred_norm == ex.label
        predictions.append({"source": ex.source, "label": ex.label, "prediction": pred, "prediction_norm": pred_norm, "scores": s.tolist()})
    n = len(examples)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n, "predictions": predictions}


def evaluate_generate(model, params: PyTree, examples: Sequence[data.Example], tokenizer, *, batch_size: int = 16,
                      max_length: int = 256, max_new_tokens: int = 32, progress: bool = False) -> dict:
    """LLM-Adapters' own protocol on instruction examples (:func:`jpeft.data.load_instruction_examples`):
    greedy generation of up to ``max_new_tokens`` after each Alpaca prompt, the answer read
    from the response as their evaluation script reads it (:func:`jpeft.data.extract_answer`:
    the first answer word named), correct when it is the label's.

    Prompts are left-padded to one width for the whole set (one compile), cut on the left to
    ``max_length - max_new_tokens``. Returns ``{"accuracy_generate", "n", "generations"}``
    (per example: the response, the answer read, the label's answer)."""
    from jpeft.models import layers

    if not examples:
        raise ValueError("evaluate_generate: no examples")
    prefix = data.ANSWER_TEMPLATE.format("")
    eos, pad = data.special_ids(tokenizer)
    room = max_length - max_new_tokens
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt and {max_new_tokens} new tokens")
    prompts = [p[-room:] for p in data.token_ids(tokenizer, [ex.prompt for ex in examples])]
    width = min(room, -(-max(map(len, prompts)) // 16) * 16)
    generations, correct = [], 0
    for first in tqdm(range(0, len(examples), batch_size), desc="generate", unit="batch", disable=not progress):
        rows = prompts[first:first + batch_size]
        ids, mask = np.full((batch_size, width), pad, np.int32), np.zeros((batch_size, width), np.int32)
        for b, p in enumerate(rows + [rows[0]] * (batch_size - len(rows))):  # the last batch filled: one shape
            ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
        out = np.asarray(sharding.host_array(layers.generate(model, params, ids, mask, max_new_tokens=max_new_tokens,
                                                             eos_token_id=eos, pad_token_id=pad)))
        for b, ex in enumerate(examples[first:first + len(rows)]):
            text = response(tokenizer, out[b, width:], (eos, pad))
            answers = [c.removeprefix(prefix) for c in ex.choices]
            read, want = data.extract_answer(text, answers), answers[ex.label]
            correct += read == want
            generations.append({"source": ex.source, "response": text, "answer": read, "label": want})
    return {"accuracy_generate": correct / len(examples), "n": len(examples), "generations": generations}


def response(tokenizer, new_ids, stop: Sequence[int]) -> str:
    """The text of generated tokens ``new_ids`` up to the first of the ``stop`` ids (EOS, pad)."""
    return tokenizer.decode(list(itertools.takewhile(lambda t: t not in stop, np.asarray(new_ids).tolist())))


def standard_error(accuracy: float, n: int) -> float:
    """The standard error of an accuracy over ``n`` independent examples, sqrt(p (1 - p) / n)."""
    return float(np.sqrt(accuracy * (1 - accuracy) / n))


def write_results(path: str | os.PathLike, task: str, results: dict, **info) -> None:
    """Write one task's results JSON (metrics, run info, per-example predictions)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"task": task, **info, **results}, f, indent=2)
