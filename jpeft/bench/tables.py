"""What a benchmark's results become: ratios to the LoRA and full fine-tuning runs, the
markdown table, the figure, and ``bench.json`` with the environment they depend on.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

from jpeft.bench.config import BenchConfig


def add_ratios(results: list[dict]) -> None:
    """``x_jpeft_lora``: step time over jpeft's LoRA step (the Phi port's, or ``wrap``'s on a
    stock-flax model); ``x_impl_lora``: over the same implementation's LoRA step;
    ``x_lora_flop``: XLA FLOP over jpeft LoRA's; ``x_full``, ``x_full_flop``: step time and
    XLA FLOP over full fine-tuning's (stock-flax models)."""
    ours = "jpeft" if any(r["impl"] == "jpeft" for r in results) else "wrap"

    def ref(impl, method, key):
        return next((r[key] for r in results if r["impl"] == impl and r["method"] == method and r.get(key)), None)

    for r in results:
        for name, impl, method, key in (("x_jpeft_lora", ours, "lora", "step_ms"), ("x_impl_lora", r["impl"], "lora", "step_ms"),
                                        ("x_lora_flop", ours, "lora", "xla_tflop_per_step"),
                                        ("x_full", "full", "full", "step_ms"), ("x_full_flop", "full", "full", "xla_tflop_per_step")):
            base = ref(impl, method, key)
            if base and r.get(key):
                r[name] = r[key] / base


def environment() -> dict:
    """Versions, commit and flags that a benchmark result depends on."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(), "commit": commit,
            "xla_flags": os.environ.get("XLA_FLAGS"), "versions": versions}


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(results: list[dict], cfg: BenchConfig, meta: dict) -> str:
    """The markdown report: timed runs, or XLA's FLOP and memory for ``compile_only``."""
    what = "XLA's compiled FLOP and memory (nothing run)" if cfg.compile_only else f"median of {cfg.steps} steps [quartiles]"
    where = ""
    per = ""
    if cfg.mesh:  # an SPMD executable is one device's program: XLA's memory figures are one device's
        where = (f" On the mesh {cfg.mesh}: the step is one device's program, so its FLOP and memory figures "
                 f"are per device; frozen GiB/device is the most of the frozen base the shardings put on one device.")
        per = " per device"
    lines = [
        f"Benchmark {meta['date']} on {meta['device']}: model {cfg.model}, batch {cfg.batch} x {cfg.seq_len}, "
        f"{cfg.compute_dtype} compute, {cfg.param_dtype} frozen weights, remat {cfg.remat}; {what}.{where} "
        f"Commit {meta['environment']['commit']}.",
        "",
    ]
    mesh_head, mesh_rule = ("mesh | frozen GiB | frozen GiB/device | ", "---|---:|---:|") if cfg.mesh else ("", "")

    def mesh_cells(r):
        if not cfg.mesh:
            return ""
        return (f"{r.get('mesh', cfg.mesh)} | {_fmt(r.get('frozen_gib'), '.4g')} | "
                f"{_fmt(r.get('frozen_gib_per_device'), '.4g')} | ")

    if cfg.compile_only:
        lines += [f"| impl | method | {mesh_head}XLA TFLOP/step{per} | x LoRA FLOP | x full FLOP | model TFLOP "
                  f"| memory estimate GiB{per} | compile s | trainable |",
                  f"|---|---|{mesh_rule}---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += [f"| impl | method | {mesh_head}step ms [q1, q3] | x jpeft LoRA | x own LoRA | x full | tokens/s | MFU "
                  f"| peak GiB{per} | XLA estimate GiB{per} | compile s | trainable |",
                  f"|---|---|{mesh_rule}---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['method']} | failed: {r['error'][:160].replace('|', '/')} |")
        elif cfg.compile_only:
            lines.append(f"| {r['impl']} | {r['method']} | {mesh_cells(r)}{_fmt(r.get('xla_tflop_per_step'), '.4g')} | "
                         f"{_fmt(r.get('x_lora_flop'), '.3f')} | {_fmt(r.get('x_full_flop'), '.3f')} | "
                         f"{r['model_tflop_per_step']:.4g} | {_fmt(r.get('memory_estimate_gib'), '.2f')} | "
                         f"{r['compile_s']:.1f} | {r['trainable']:,} |")
        else:
            lines.append(
                f"| {r['impl']} | {r['method']} | {mesh_cells(r)}{r['step_ms']:.1f} [{r['step_ms_q1']:.1f}, {r['step_ms_q3']:.1f}] | "
                f"{_fmt(r.get('x_jpeft_lora'), '.2f')} | {_fmt(r.get('x_impl_lora'), '.2f')} | {_fmt(r.get('x_full'), '.2f')} | "
                f"{r['tokens_per_s']:,.0f} | "
                f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('peak_memory_gib'), '.2f')} | "
                f"{_fmt(r.get('memory_estimate_gib'), '.2f')} | {r['compile_s']:.1f} | {r['trainable']:,} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], cfg: BenchConfig, meta: dict, path: str) -> None:
    """Two panels: step time (or XLA FLOP for ``compile_only``) and memory, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    time_key, time_label = (("xla_tflop_per_step", "XLA TFLOP per step") if cfg.compile_only
                            else ("step_ms", "median step time (ms)"))
    colors = {"jpeft": "tab:blue", "wrap": "tab:blue", "peft-eager": "tab:gray", "peft-compiled": "tab:orange",
              "materialize": "tab:red", "qwix": "tab:green", "full": "tab:purple"}
    colors.update({f"jpeft-{kind}": "tab:cyan" for kind in ("nf4", "fp4", "int8")})  # a quantized base
    labels = [f"{r['method']}\n{r['impl']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(ok)), 4))
    memory = [r.get("peak_memory_gib") or r.get("memory_estimate_gib") or 0 for r in ok]
    for ax, values, label in ((axes[0], [r.get(time_key) or 0 for r in ok], time_label),
                              (axes[1], memory, "peak memory (GiB; XLA's estimate without a device counter)")):
        ax.bar(labels, values, color=[colors[r["impl"]] for r in ok])
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    lora = next((r for r in ok if r["impl"] in ("jpeft", "wrap") and r["method"] == "lora" and r.get(time_key)), None)
    if lora:  # the issue's bar: every method within 1.25x of jpeft's LoRA
        axes[0].axhline(1.25 * lora[time_key], color="k", linestyle="--", linewidth=0.8, label="1.25 x jpeft LoRA")
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{cfg.model}, batch {cfg.batch}x{cfg.seq_len}, {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict], cfg: BenchConfig, out_dir: str) -> dict[str, str]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "config": dataclasses.asdict(cfg),
            "device": next((r.get("device") for r in results if r.get("device")), None), "environment": environment()}
    paths = {k: os.path.join(out_dir, f"bench.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(table(results, cfg, meta))
    plot(results, cfg, meta, paths["png"])
    return paths
