"""A few training steps of the thesis' methods (and HRA) on the real SmolLM2-135M-Instruct, as a
user runs them: ``jpeft train --model smollm2-135m`` on real ARC-Easy training records (the
Hugging Face schema, the thesis' PromptSource template), Q/K/V
targets with the thesis' hyper-parameters. Writes a table of trainable parameters, the loss
of the first and last steps and the wall time of the whole run (loading the model, adapting,
compiling, the steps); step times belong to ``jpeft bench``.

    python experiments/smollm2_steps.py --data-dir ../shared/data/hf --steps 6 --out experiments/results/DIR

It is a smoke run at a realistic size (it finds hangs, slow paths and broken methods that tiny
shapes hide), not an accuracy experiment: a handful of steps teaches the model nothing yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax

from jpeft import pipeline, train

METHODS = ("lora", "dora", "lokr", "oft", "boft", "shoft", "rhoft", "hra")
#: the thesis' settings (Table A.1) where they fit SmolLM2's 576-wide attention (k_proj/v_proj: 192 outputs)
HPARAMS = {"lora": {"r": 16, "alpha": 32.0}, "dora": {"r": 16, "alpha": 32.0}, "lokr": {"r": 16},
           "oft": {"block_size": 64}, "boft": {"block_size": 8, "n_butterfly": 2},
           "shoft": {"r_u": 16, "r_v": 16}, "rhoft": {"r_u": 16, "r_v": 16}, "hra": {"r": 16}}


def run(method: str, args) -> dict:
    cfg = pipeline.RunConfig(
        model="smollm2-135m", method=method, hparams=HPARAMS[method], tasks=("arc_easy",), data_dir=args.data_dir,
        limit=args.batch_size * args.steps, seed=0,
        train=train.TrainConfig(learning_rate=5e-4, warmup_steps=1, batch_size=args.batch_size,
                                max_length=args.max_length, compute_dtype="float32"),
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = pipeline.finetune(cfg, run_dir, max_steps=args.steps, stop_at=args.steps, log_every=1,
                                    checkpoint_every=args.steps, progress=False)
    log = summary["log"]
    return {"method": method, "hparams": HPARAMS[method], "trainable": summary["trainable"],
            "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "wall_s": time.perf_counter() - start}


def write(rows: list[dict], env: dict, out: str) -> None:
    """``steps.json`` and ``steps.md`` (rewritten after every method: partial results are kept)."""
    with open(os.path.join(out, "steps.json"), "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2)
    lines = ["| method | hyper-parameters | trainable | loss, step 1 | loss, last step | wall s (load + compile + steps) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['hparams']} | {r['trainable']:,} | {r['loss_first']:.3f} | {r['loss_last']:.3f} "
              f"| {r['wall_s']:.0f} |" for r in rows]
    with open(os.path.join(out, "steps.md"), "w") as f:
        f.write(f"SmolLM2-135M-Instruct, {env['steps']} steps x batch {env['batch']} x {env['max_length']} tokens, "
                f"float32, {env['cores']} CPU cores ({env['device']})\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="{task}/train.jsonl in HF schemas (arc_easy)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for method in args.methods:
        rows.append(run(method, args))
        print(json.dumps(rows[-1]), flush=True)
        env = {"jax": jax.__version__, "device": str(jax.devices()[0]), "cpu": platform.processor(),
               "cores": os.cpu_count(), "steps": args.steps, "batch": args.batch_size, "max_length": args.max_length}
        write(rows, env, args.out)


if __name__ == "__main__":
    main()
