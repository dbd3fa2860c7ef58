"""Multiple-choice evaluation by answer log-likelihood (the thesis' accuracy metric).

Each (example, choice) row is ``prompt + " " + choice``; its score is the summed
log-probability of the choice tokens given the prompt. ``accuracy`` takes the arg-max of
the sums, ``accuracy_norm`` of the sums divided by the choice's character length (the
``acc_norm`` of lm-evaluation-harness). Rows are scored in fixed-shape, jitted batches.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import data, sharding, train

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


def evaluate(
    model,
    params: PyTree,
    examples: Sequence[data.Example],
    tokenizer,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    score_fn: Callable | None = None,
) -> dict:
    """Accuracy and length-normalized accuracy of ``params`` on ``examples``.

    ``params`` may hold jpeft nodes (the model runs their factored path) or plain arrays.
    Returns ``{"accuracy", "accuracy_norm", "n", "predictions"}`` where ``predictions``
    lists, per example, the chosen index, the label and the per-choice scores.
    """
    if not examples:
        raise ValueError("evaluate: no examples")
    score_fn = score_fn or make_score_fn(model)
    scores = [np.full(len(ex.choices), np.nan) for ex in examples]
    for batch in data.choice_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length):
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


def write_results(path: str | os.PathLike, task: str, results: dict, **info) -> None:
    """Write one task's results JSON (metrics, run info, per-example predictions)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"task": task, **info, **results}, f, indent=2)
