"""Shared pieces of the experiment scripts: one fine-tuning run per grid point, tables, plots."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

from jpeft import pipeline, train


def rank_hparams(method: str, r: int, dim: int = 2048) -> dict:
    """The method's hyper-parameters at "rank" r, sized like LoRA r (thesis §5.4: OFT's block
    size is a function of LoRA's rank so both train about as many parameters)."""
    pow2 = lambda x: 1 << max(1, round(x).bit_length() - 1)  # noqa: E731 - largest power of two <= x
    if method in ("lora", "dora"):
        return {"r": r, "alpha": 2.0 * r}
    if method == "lokr":
        return {"r": r, "alpha": 2.0 * r}
    if method == "oft":  # d(b-1)/2 ≈ 2dr  ->  b ≈ 4r
        return {"block_size": min(pow2(4 * r), dim)}
    if method == "boft":  # d·b + d ≈ 2dr  ->  b ≈ 2r
        return {"block_size": min(pow2(2 * r), dim)}
    if method in ("shoft", "rhoft", "hoft"):
        return {"r_u": r, "r_v": r}
    if method in ("hra", "loraxs", "mora"):  # MoRA's r is LoRA's budget by design
        return {"r": r}
    if method in ("loha", "sbora", "dylora"):
        return {"r": r, "alpha": 2.0 * r}
    if method == "adalora":  # starts at 1.5 r and prunes to r, as the paper's 12 -> 8
        return {"r": r + r // 2, "target_r": r}
    if method == "vera":  # the paper's r=256 at LoRA r=16: VeRA's rank is large by design
        return {"r": min(16 * r, dim)}
    if method == "svft":  # banded d: about (2d + 1)·dim entries, LoRA r trains 2·r·dim
        return {"pattern": "banded", "d": r}
    if method in ("ia3", "bitfit"):  # nothing to size: the same run at every rank
        return {}
    raise ValueError(f"no rank mapping for {method!r}")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thesis", action="store_true",
                   help="the thesis' setting: --model must be a Phi-1.5 checkpoint, all tasks, full data, 3 epochs")
    p.add_argument("--model", default="tiny")
    p.add_argument("--tasks", nargs="+", default=["all"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 40 on the tiny model, epochs otherwise)")
    p.add_argument("--out", required=True, help="directory for runs, results table and plot")


def base_config(args, method: str, hparams: dict, seed: int) -> pipeline.RunConfig:
    thesis = args.thesis
    tcfg = train.TrainConfig(seed=seed) if thesis else train.TrainConfig(
        learning_rate=3e-3, warmup_steps=5, batch_size=8, max_length=160, compute_dtype="float32", seed=seed)
    return pipeline.RunConfig(
        model=args.model, method=method, hparams=hparams,
        targets=None if thesis or args.model != "tiny" else (r".*/kernel",),  # random tiny weights: adapt everything
        tasks=pipeline.parse_tasks(args.tasks), data_dir=args.data_dir, seed=seed, train=tcfg,
    )


def run_point(args, name: str, method: str, hparams: dict, seed: int) -> dict:
    """Fine-tune and evaluate one grid point (skipped if its results already exist)."""
    run_dir = os.path.join(args.out, "runs", f"{name}-s{seed}")
    done = os.path.join(run_dir, "summary.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    cfg = base_config(args, method, hparams, seed)
    steps = args.steps if args.steps is not None else (None if args.thesis else 40)
    summary = pipeline.finetune(cfg, run_dir, max_steps=steps, log_every=10, progress=False)
    summary = {"name": name, "method": method, "hparams": hparams, "seed": seed, "trainable": summary["trainable"],
               "final_loss": summary["final_loss"], "results": summary["results"]}
    with open(done, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def aggregate(summaries: list[dict], key: str) -> dict:
    """``{(method, key value): {task: mean accuracy, "average": …, "std": …}}`` over seeds."""
    groups = defaultdict(list)
    for s in summaries:
        groups[(s["method"], s[key])].append(s)
    table = {}
    for group, runs in groups.items():
        tasks = runs[0]["results"]
        row = {t: statistics.mean(r["results"][t]["accuracy"] for r in runs) for t in tasks}
        averages = [statistics.mean(r["results"][t]["accuracy"] for t in tasks) for r in runs]
        row["average"] = statistics.mean(averages)
        row["std"] = statistics.stdev(averages) if len(averages) > 1 else 0.0
        row["trainable"] = runs[0]["trainable"]
        table[group] = row
    return table


def write_table(table: dict, key: str, out: str, title: str) -> str:
    """Markdown table (accuracy in %), JSON and a line plot of the average against ``key``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in next(iter(table.values())) if t not in ("average", "std", "trainable")]
    lines = [f"# {title}", "", f"| method | {key} | trainable | " + " | ".join(tasks) + " | average ± std |",
             "|---|---:|---:|" + "---:|" * len(tasks) + "---:|"]
    for (method, value), row in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cells = " | ".join(f"{100 * row[t]:.1f}" for t in tasks)
        lines.append(f"| {method} | {value} | {row['trainable']:,} | {cells} | {100 * row['average']:.1f} ± {100 * row['std']:.1f} |")
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump([{"method": m, key: v, **row} for (m, v), row in table.items()], f, indent=2)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({m for m, _ in table}):
        points = sorted((v, row["average"]) for (m, v), row in table.items() if m == method)
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                    yerr=[100 * table[(method, p[0])]["std"] for p in points], marker="o", label=method, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=120)
    plt.close(fig)
    return md
