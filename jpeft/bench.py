"""Training-step benchmark: jpeft methods (and optionally HF PEFT, eager and compiled).

Each configuration runs in its own subprocess, so compile caches and the device's peak
memory counter start clean. A worker builds the model with random weights, applies the
method, compiles the real train step (AdamW over the trainable partition), runs
``warmup`` steps, then times ``steps`` steps one by one (each synchronized with
``block_until_ready``) and reports the median. Model FLOP utilization counts the work a
frozen-base PEFT step must do, forward plus backward to activations: ``4 · N · T`` for
the ``N`` matmul parameters and ``T`` tokens, plus attention's ``8 · L · T · S · d``
(DESIGN.md §4), over the device's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

#: Dense bf16 peak FLOP/s by device kind (substring match on ``device_kind``).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 3090": 71e12}

METHOD_ORDER = ("lora", "dora", "lokr", "oft", "boft", "shoft", "rhoft")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"  # a name known to jpeft.models.phi.config
    batch: int = 16
    seq_len: int = 256
    methods: tuple[str, ...] = METHOD_ORDER
    targets: tuple[str, ...] | None = None  # regexes; None: Q/K/V
    compute_dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"  # frozen base weights; trainables are always float32
    warmup: int = 3
    steps: int = 10
    hparams: dict = dataclasses.field(default_factory=dict)  # {method: {name: value}}


def model_flops_per_step(config, tokens: int, seq_len: int) -> float:
    """``4·N·T`` for the matmul parameters (embedding lookup excluded) + attention."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    n_matmul = layers * (4 * h * h + 2 * h * inter) + h * vocab
    attention = 8.0 * layers * tokens * seq_len * h / 2  # causal: half of QKᵀ and PV
    return 4.0 * n_matmul * tokens + attention


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def _timed(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def run_jpeft(cfg: BenchConfig, method: str) -> dict:
    """Time one jpeft method (runs in a worker process)."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft import train
    from jpeft.models import phi

    dtype, pdtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    config = phi.config(cfg.model)
    model, params = phi.init(config, jax.random.key(0), dtype=dtype, param_dtype=pdtype)
    adapted = jpeft.apply(params, method, key=jax.random.key(1), targets=list(cfg.targets) if cfg.targets else None,
                          **cfg.hparams.get(method, {}))
    del params
    trainable, frozen = jpeft.partition(adapted)
    tcfg = train.TrainConfig(batch_size=cfg.batch, warmup_steps=10, compute_dtype=cfg.compute_dtype)
    tx = train.optimizer(tcfg, 1000)
    state = train.init_state(trainable, tx, 0)
    ids = jax.random.randint(jax.random.key(2), (cfg.batch, cfg.seq_len), 0, config.vocab_size, jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "targets": jnp.roll(ids, -1, axis=1),
             "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    step = train.make_train_step(train.lm_loss_fn(model), tx, 1)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    median, times = _timed(one, cfg.warmup, cfg.steps)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    tokens = cfg.batch * cfg.seq_len
    flops = model_flops_per_step(config, tokens, cfg.seq_len)
    peak = peak_flops(device)
    return {
        "impl": "jpeft",
        "method": method,
        "step_ms": 1e3 * median,
        "step_ms_all": [1e3 * t for t in times],
        "tokens_per_s": tokens / median,
        "mfu": flops / median / peak if peak else None,
        "model_tflop_per_step": flops / 1e12,
        "peak_memory_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        "compiled_temp_gib": getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory else None,
        "compile_s": compile_s,
        "trainable": jpeft.count_params(adapted)["trainable"],
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
    }


PEFT_CONFIGS = {
    "lora": lambda t, hp: ("LoraConfig", dict(r=hp.get("r", 16), lora_alpha=hp.get("alpha", 32), target_modules=t)),
    "dora": lambda t, hp: ("LoraConfig", dict(r=hp.get("r", 16), lora_alpha=hp.get("alpha", 32), target_modules=t, use_dora=True)),
    "lokr": lambda t, hp: ("LoKrConfig", dict(r=hp.get("r", 16), alpha=hp.get("alpha", 32), target_modules=t)),
    "oft": lambda t, hp: ("OFTConfig", dict(r=0, oft_block_size=hp.get("block_size", 64), target_modules=t)),
    "boft": lambda t, hp: ("BOFTConfig", dict(boft_block_size=hp.get("block_size", 8), boft_n_butterfly_factor=hp.get("n_butterfly", 1), target_modules=t)),
    "hra": lambda t, hp: ("HRAConfig", dict(r=hp.get("r", 16), target_modules=t)),
}


def run_peft(cfg: BenchConfig, method: str, compiled: bool) -> dict:
    """Time HF PEFT (torch) on the same configuration: fp32 master weights, bf16 autocast, AdamW."""
    import peft
    import torch

    from jpeft.models import phi

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = phi.config(cfg.model)
    from transformers import PhiForCausalLM

    model = PhiForCausalLM(config).to(device)
    cls, kwargs = PEFT_CONFIGS[method](["q_proj", "k_proj", "v_proj"], cfg.hparams.get(method, {}))
    model = peft.get_peft_model(model, getattr(peft, cls)(**kwargs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq_len), device=device)
    forward = torch.compile(model) if compiled else model
    amp = torch.autocast(device_type=device, dtype=getattr(torch, cfg.compute_dtype))

    def one():
        with amp:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    one()
    compile_s = time.perf_counter() - start
    median, times = _timed(one, cfg.warmup, cfg.steps)
    tokens = cfg.batch * cfg.seq_len
    return {
        "impl": "peft-compiled" if compiled else "peft-eager",
        "method": method,
        "step_ms": 1e3 * median,
        "step_ms_all": [1e3 * t for t in times],
        "tokens_per_s": tokens / median,
        "mfu": None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "compile_s": compile_s,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": device,
    }


def _worker(payload: str) -> None:
    job = json.loads(payload)
    cfg = BenchConfig(**{**job["config"], "methods": tuple(job["config"]["methods"]),
                         "targets": tuple(job["config"]["targets"]) if job["config"]["targets"] else None})
    if job["impl"] == "jpeft":
        result = run_jpeft(cfg, job["method"])
    else:
        result = run_peft(cfg, job["method"], compiled=job["impl"] == "peft-compiled")
    print("JPEFT_BENCH_RESULT " + json.dumps(result))


def run(cfg: BenchConfig, *, peft: bool = False, peft_modes: tuple[str, ...] = ("eager", "compiled"),
        timeout: float = 1800) -> list[dict]:
    """Every method of ``cfg`` (and HF PEFT's ``peft_modes`` runs if ``peft``), one subprocess each."""
    jobs = [("jpeft", m) for m in cfg.methods]
    if peft:
        jobs += [(f"peft-{mode}", m) for mode in peft_modes for m in cfg.methods if m in PEFT_CONFIGS]
    results = []
    for impl, method in jobs:
        payload = json.dumps({"impl": impl, "method": method, "config": dataclasses.asdict(cfg)})
        proc = subprocess.run([sys.executable, "-m", "jpeft.bench", payload], capture_output=True, text=True, timeout=timeout)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("JPEFT_BENCH_RESULT ")), None)
        if line is None:
            results.append({"impl": impl, "method": method, "error": (proc.stderr or proc.stdout)[-2000:]})
        else:
            results.append(json.loads(line.split(" ", 1)[1]))
        r = results[-1]
        print(f"  {impl:14s} {method:6s} " + (f"{r['step_ms']:9.1f} ms/step" if "step_ms" in r else "FAILED"), flush=True)
    lora = next((r["step_ms"] for r in results if r["impl"] == "jpeft" and r["method"] == "lora" and "step_ms" in r), None)
    for r in results:
        if lora and "step_ms" in r:
            r["x_jpeft_lora"] = r["step_ms"] / lora
    return results


def write_outputs(results: list[dict], cfg: BenchConfig, out_dir: str) -> dict[str, str]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "config": dataclasses.asdict(cfg),
            "device": next((r.get("device") for r in results if r.get("device")), None)}
    paths = {k: os.path.join(out_dir, f"bench.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"Benchmark {meta['date']} on {meta['device']}: model {cfg.model}, batch {cfg.batch} x {cfg.seq_len}, "
        f"{cfg.compute_dtype} compute, {cfg.param_dtype} frozen weights, median of {cfg.steps} steps.",
        "",
        "| impl | method | step ms | x jpeft LoRA | tokens/s | MFU | peak GiB | compile s | trainable |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['method']} | failed | | | | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['method']} | {r['step_ms']:.1f} | {fmt(r.get('x_jpeft_lora'), '.2f')} | "
            f"{r['tokens_per_s']:,.0f} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_memory_gib'), '.2f')} | "
            f"{r['compile_s']:.1f} | {r['trainable']:,} |"
        )
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    ok = [r for r in results if "step_ms" in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
    colors = {"jpeft": "tab:blue", "peft-eager": "tab:gray", "peft-compiled": "tab:orange"}
    ax.bar([f"{r['method']}\n{r['impl']}" for r in ok], [r["step_ms"] for r in ok], color=[colors[r["impl"]] for r in ok])
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"{cfg.model}, batch {cfg.batch}x{cfg.seq_len}, {meta['device']}")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    _worker(sys.argv[1])
