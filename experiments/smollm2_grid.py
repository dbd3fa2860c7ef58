"""The thesis' methods (and HRA) on the real SmolLM2-135M-Instruct: accuracy on held-out records.

For each task, the zero-shot accuracy of the base, then for each method and seed one run of
``--steps`` steps of ``--batch-size`` training records (the same budget for every method),
scored on ``--holdout`` records held out of the task's training file (``jpeft.data.holdout``):

- ARC-Easy, ARC-Challenge, OpenBookQA: the Hugging Face schema files (``--data-dir``), with
  lm-evaluation-harness' prompts and answer texts (``--template harness``; acc, acc_norm);
- BoolQ: LLM-Adapters' question-only records (``--llm-adapters-dir``), trained on their
  instruction format and scored by the likelihood of "the correct answer is true/false".

Methods use the thesis' Q/K/V targets and its hyper-parameters where they fit SmolLM2's widths
(``smollm2_steps.HPARAMS``), AdamW, lr ``--lr`` with 10 warm-up steps then linear decay, float32.
Writes ``results.json``, ``results.md`` and ``results.png`` under ``--out`` after every cell,
so a stopped run keeps what it measured; a cell already in ``results.json`` is not run again.

    python experiments/smollm2_grid.py --data-dir ../shared/data/hf \\
        --llm-adapters-dir ../shared/data/llm-adapters --out experiments/results/DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax

from jpeft import data, pipeline, train
from smollm2_steps import HPARAMS, METHODS

TASKS = ("arc_easy", "arc_challenge", "obqa", "boolq")


def task_config(task: str, method: str, args, seed: int, scratch: str) -> pipeline.RunConfig:
    tcfg = train.TrainConfig(learning_rate=args.lr, warmup_steps=10, batch_size=args.batch_size, max_length=args.max_length,
                             compute_dtype="float32", seed=seed)
    common = dict(model="smollm2-135m", method=method, hparams=HPARAMS.get(method, {}), seed=seed, train=tcfg)
    if task != "boolq":
        return pipeline.RunConfig(tasks=(task,), template="harness", data_dir=args.data_dir, holdout=args.holdout, **common)
    # LLM-Adapters' BoolQ has no validation split: the same held-out records, written once
    rest, held = (os.path.join(scratch, f"boolq_{name}.json") for name in ("train", "heldout"))
    if not os.path.exists(held):
        records = data.read_records(os.path.join(args.llm_adapters_dir, "boolq", "train.json"))
        for path, part in zip((rest, held), data.holdout(records, args.holdout)):
            with open(path, "w") as f:
                json.dump(part, f)
    return pipeline.RunConfig(tasks=(), instructions=rest, eval_instructions=(held,), **common)


def cell(task: str, method: str, seed: int, args, scratch: str) -> dict:
    start = time.perf_counter()
    if method == "zero-shot":
        results = pipeline.zero_shot(task_config(task, "lora", args, seed, scratch))
    else:
        with tempfile.TemporaryDirectory() as run_dir:
            summary = pipeline.finetune(task_config(task, method, args, seed, scratch), run_dir, max_steps=args.steps,
                                        checkpoint_every=args.steps, log_every=10, progress=False)
        results = summary["results"]
    (r,) = results.values()
    budget = {} if method == "zero-shot" else {"steps": args.steps, "batch": args.batch_size, "lr": args.lr}
    return {"task": task, "method": method, "seed": seed, **budget, **r, "wall_s": time.perf_counter() - start}


def write(cells: list[dict], env: dict, out: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"environment": env, "cells": cells}, f, indent=2)
    # every cell measured so far, also those of earlier invocations with other --tasks/--methods
    methods = ["zero-shot"] + [m for m in METHODS if m in env["methods"] or any(c["method"] == m for c in cells)]
    tasks = [t for t in TASKS if t in env["tasks"] or any(c["task"] == t for c in cells)]
    lines = [f"SmolLM2-135M-Instruct, {env['steps']} steps x {env['batch']} records per run, {env['holdout']} held-out "
             f"records per task; acc_norm (acc) in %, mean ± spread over seeds; {env['device']}, {env['date']}\n",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m in methods:
        row = []
        for t in tasks:
            got = [c for c in cells if c["task"] == t and c["method"] == m]
            if not got:
                row.append("(not run)")
                continue
            norm, acc = ([100 * c[k] for c in got] for k in ("accuracy_norm", "accuracy"))
            spread = f" ± {statistics.stdev(norm):.1f}" if len(norm) > 1 else ""
            row.append(f"{statistics.mean(norm):.1f}{spread} ({statistics.mean(acc):.1f})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        values = [statistics.mean([100 * c["accuracy_norm"] for c in cells if c["task"] == t and c["method"] == m] or [0])
                  for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=m)
    ax.set(xticks=[j + 0.4 - width / 2 for j in range(len(tasks))], xticklabels=tasks,
           ylabel="acc_norm, % of held-out records", title="SmolLM2-135M-Instruct, one training budget per run")
    ax.legend(ncol=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="{task}/train.jsonl in HF schemas (arc_easy, arc_challenge, obqa)")
    p.add_argument("--llm-adapters-dir", default=None, help="boolq/train.json of LLM-Adapters (for the boolq task)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--holdout", type=int, default=200)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if "boolq" in args.tasks and not args.llm_adapters_dir:
        p.error("the boolq task needs --llm-adapters-dir")
    os.makedirs(args.out, exist_ok=True)
    env = {"jax": jax.__version__, "device": f"{jax.devices()[0].platform}, {os.cpu_count()} cores ({platform.processor()})",
           "date": time.strftime("%Y-%m-%d"), "tasks": args.tasks, "methods": args.methods, "steps": args.steps,
           "batch": args.batch_size, "lr": args.lr, "holdout": args.holdout, "seeds": args.seeds, "hparams": HPARAMS}
    path = os.path.join(args.out, "results.json")
    cells = json.load(open(path))["cells"] if os.path.exists(path) else []
    done = {(c["task"], c["method"], c["seed"]) for c in cells}
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            for method, seed in [("zero-shot", 0)] + [(m, s) for m in args.methods for s in range(args.seeds)]:
                if (task, method, seed) in done:
                    continue
                cells.append(cell(task, method, seed, args, scratch))
                print(json.dumps({k: v for k, v in cells[-1].items()}), flush=True)
                write(cells, env, args.out)


if __name__ == "__main__":
    main()
