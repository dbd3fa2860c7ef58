"""The HF PEFT side of the SmolLM2-135M ARC-Easy LoRA run, on the records jpeft uses.

transformers' ``LlamaForCausalLM`` loaded from the same GGUF file (dequantized), the same
held-out ARC-Easy records (``jpeft.data.holdout``, 200 of the training file), the same
lm-evaluation-harness prompts and choices (rendered by ``jpeft.data``), the same training
batches (``jpeft.data.batches``: order, answer-only loss with EOS) and the same
configuration: LoRA r 16, alpha 32, dropout 0.05 on the seven linear kinds, AdamW lr 5e-4,
10 warm-up steps then linear decay, 120 steps of 8. Scoring is PEFT's usual one forward per
(example, choice); ``acc`` and ``acc_norm`` (per character) as the harness computes them.

    python experiments/peft_arc_lora.py --data-dir ../shared/data/hf --out experiments/results/DIR

writes ``DIR/peft.json`` (accuracies before and after, step and scoring times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from jpeft import data
from jpeft.models import download

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def score(model, tokenizer, examples) -> dict:
    """acc / acc_norm with one forward per (example, choice), the choices of an example in one batch."""
    correct = correct_norm = 0
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for ex in examples:
            prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
            rows = [prompt + tokenizer(ex.answer_prefix + c, add_special_tokens=False)["input_ids"] for c in ex.choices]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            sums = []
            for i, r in enumerate(rows):
                targets = torch.tensor(r[len(prompt):])
                sums.append(float(logp[i, len(prompt) - 1:len(r) - 1].gather(-1, targets[:, None]).sum()))
            sums = np.array(sums)
            correct += int(np.argmax(sums)) == ex.label
            correct_norm += int(np.argmax(sums / np.array([len(c) for c in ex.choices]))) == ex.label
    n = len(examples)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="arc_easy/train.jsonl in the HF schema")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--holdout", type=int, default=200)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = download.fetch("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    examples = data.load_task("arc_easy", "train", path=os.path.join(args.data_dir, "arc_easy", "train.jsonl"),
                              template="harness")
    rest, held = data.holdout(examples, args.holdout)
    os.makedirs(args.out, exist_ok=True)
    result = {"environment": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                              "threads": args.threads, "cpu": platform.processor(), "date": time.strftime("%Y-%m-%d")},
              "zero_shot": score(model, tokenizer, held)}
    print(json.dumps(result["zero_shot"]), flush=True)

    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-4, weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 10, args.steps)
    encoded = data.encode_pairs(data.training_pairs(rest), tokenizer, 128)
    model.train()
    times, losses = [], []
    for step, batch in enumerate(data.batches(encoded, batch_size=args.batch_size, seed=0)):
        if step == args.steps:
            break
        t = time.perf_counter()
        logits = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(batch["attention_mask"])).logits.float()
        mask = torch.tensor(batch["loss_mask"])
        nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        if step % 10 == 0:
            print(f"step {step + 1} loss {losses[-1]:.4f} {times[-1]:.2f} s", flush=True)
    result["train"] = {"steps": len(times), "batch_size": args.batch_size, "median_step_s": float(np.median(times)),
                       "loss_first": losses[0], "loss_last": losses[-1], "losses": losses}
    result["after"] = score(model, tokenizer, held)
    print(json.dumps(result["after"]), flush=True)
    with open(os.path.join(args.out, "peft.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
