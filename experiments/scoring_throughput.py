"""Multiple-choice scoring on the real SmolLM2-135M: one forward per (example, choice) against
one forward per prompt (its key/value cache serving every choice), on the same records.

Both paths of :func:`jpeft.eval.evaluate` score the held-out ARC-Easy records (``--holdout``
of the training file, lm-evaluation-harness' prompts and answer texts) twice: the first pass
includes the compiles, the second is the compiled throughput. The per-choice and cached
log-likelihoods are compared (largest difference relative to the score's size).

    python experiments/scoring_throughput.py --data-dir ../shared/data/hf --out experiments/results/DIR

writes ``DIR/scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import eval as evaluation, pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="arc_easy/train.jsonl in the HF schema")
    p.add_argument("--out", required=True)
    p.add_argument("--holdout", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    cfg = pipeline.RunConfig(model="smollm2-135m", tasks=("arc_easy",), template="harness", data_dir=args.data_dir,
                             holdout=args.holdout)
    model, params, _ = pipeline.load_model(cfg.model, jnp.float32, jnp.float32)
    tokenizer = pipeline.load_tokenizer(cfg)
    (examples,) = pipeline.eval_sets(cfg, tokenizer).values()
    result = {"environment": {"jax": jax.__version__, "cpu": platform.processor(), "cores": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d"), "records": len(examples),
                              "choices": sum(len(ex.choices) for ex in examples), "batch_size": args.batch_size,
                              "max_length": args.max_length}}
    scores = {}
    for name, cached in (("per_choice", False), ("cached", True)):
        score_fn = (evaluation.make_cached_score_fn if cached else evaluation.make_score_fn)(model)
        passes = []
        for _ in range(2):
            start = time.perf_counter()
            out = evaluation.evaluate(model, params, examples, tokenizer, batch_size=args.batch_size,
                                      max_length=args.max_length, score_fn=score_fn, cached=cached)
            passes.append(time.perf_counter() - start)
        scores[name] = np.concatenate([p["scores"] for p in out["predictions"]])
        result[name] = {"accuracy": out["accuracy"], "accuracy_norm": out["accuracy_norm"],
                        "first_pass_s": passes[0], "compiled_pass_s": passes[1],
                        "examples_per_s": len(examples) / passes[1]}
        print(name, json.dumps(result[name]), flush=True)
    diff = np.abs(scores["cached"] - scores["per_choice"]) / np.maximum(np.abs(scores["per_choice"]), 1.0)
    result["max_relative_difference"] = float(diff.max())
    result["speedup"] = result["per_choice"]["compiled_pass_s"] / result["cached"]["compiled_pass_s"]
    print(json.dumps({k: result[k] for k in ("max_relative_difference", "speedup")}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scoring.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
