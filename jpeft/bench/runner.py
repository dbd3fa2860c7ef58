"""The jobs of a benchmark and the worker processes that run them: one subprocess per job
(``python -m jpeft.bench PAYLOAD``), so compile caches and the peak memory counter start
clean; a job that dies is recorded with why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Callable

from jpeft.bench.config import HOUSEHOLDER, BenchConfig, is_flax_model, mesh_devices
from jpeft.bench.jpeft_runs import run_jpeft
from jpeft.bench.peft_runs import PEFT_METHODS, run_peft
from jpeft.bench.tables import add_ratios


def worker(payload: str) -> None:
    """Run one job (``python -m jpeft.bench PAYLOAD``) and print its result line."""
    job = json.loads(payload)
    c = job["config"]
    cfg = BenchConfig(**{**c, "methods": tuple(c["methods"]), "targets": tuple(c["targets"]) if c["targets"] else None})
    if job["impl"].startswith("peft-"):
        result = run_peft(cfg, job["method"], compiled=job["impl"] == "peft-compiled")
    else:
        result = run_jpeft(cfg, job["method"], job["impl"])
    print("JPEFT_BENCH_RESULT " + json.dumps(result))


def jobs(cfg: BenchConfig, peft: bool, peft_modes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(impl, method) pairs: every jpeft method, then PEFT's counterparts per mode (PEFT
    lacks SHOFT/RHOFT: its HRA is timed as their Householder baseline). A stock-flax
    model runs every method through ``wrap``, then LoRA by the materialize route and
    qwix, then full fine-tuning."""
    if peft and cfg.mesh is not None:
        raise ValueError(f"--peft times HF PEFT on one device and cannot be combined with a mesh ({cfg.mesh})")
    if is_flax_model(cfg.model):
        if peft:
            raise ValueError("--peft compares with jpeft's ports; a stock-flax model is compared with qwix and full fine-tuning")
        out = [("wrap", m) for m in cfg.methods]
        if "lora" in cfg.methods:
            out += [("materialize", "lora"), ("qwix", "lora")]
        return out + [("full", "full")]
    out = [("jpeft", m) for m in cfg.methods]
    if cfg.quantize:
        out += [(f"jpeft-{cfg.quantize}", m) for m in cfg.methods]
    if peft:
        if cfg.compile_only:
            raise ValueError("--peft times HF PEFT and cannot be combined with compile_only")
        bad = set(peft_modes) - {"eager", "compiled"}
        if bad:
            raise ValueError(f"peft_modes must be 'eager' and/or 'compiled', got {sorted(bad)}")
        ours = [m for m in cfg.methods if m in PEFT_METHODS]
        if any(m in HOUSEHOLDER for m in cfg.methods) and "hra" not in ours:
            ours.append("hra")
        out += [(f"peft-{mode}", m) for mode in peft_modes for m in ours]
    return out


def job_failure(impl: str, method: str, returncode: int | None, output: str | bytes | None,
                timeout: float | None = None) -> dict:
    """The record of a job that printed no result: why it died (a timeout, a signal or an
    exit code) and the last line it wrote, in ``error``; the end of its output in ``log``."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    log = (output or "").strip()[-4000:]
    if timeout is not None:
        reason = f"timed out after {timeout:.0f} s"
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        reason = f"killed by {name} (signal {-returncode})"
    else:
        reason = f"exited with code {returncode}" + (" without printing a result" if returncode == 0 else "")
    last = log.splitlines()[-1].strip() if log else "no output"
    return {"impl": impl, "method": method, "error": f"{reason}; last output: {last}", "log": log}


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def worker_env(cfg: BenchConfig, environ: dict | None = None) -> dict:
    """The worker's environment: ``environ`` (default ``os.environ``), and with a mesh of
    ``N`` devices ``XLA_FLAGS`` asking for at least ``N`` host (CPU) devices, appended to
    the flags there (a smaller count there is raised). The flag only shapes the CPU
    platform: on an accelerator the mesh takes that many real devices or the worker
    refuses (:func:`bench_mesh`)."""
    env = dict(os.environ if environ is None else environ)
    if cfg.mesh is None or mesh_devices(cfg.mesh) == 1:
        return env
    need = mesh_devices(cfg.mesh)
    flags = env.get("XLA_FLAGS", "").split()
    given = [f for f in flags if f.startswith(HOST_DEVICES_FLAG + "=")]
    have = max((int(f.partition("=")[2]) for f in given if f.partition("=")[2].isdigit()), default=0)
    if have < need:
        flags = [f for f in flags if f not in given] + [f"{HOST_DEVICES_FLAG}={need}"]
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def _run_job(impl: str, method: str, cfg: BenchConfig, timeout: float) -> dict:
    payload = json.dumps({"impl": impl, "method": method, "config": dataclasses.asdict(cfg)})
    try:
        proc = subprocess.run([sys.executable, "-m", "jpeft.bench", payload], capture_output=True, text=True, timeout=timeout,
                              env=worker_env(cfg))
    except subprocess.TimeoutExpired as e:  # the worker was killed; keep what it wrote
        return job_failure(impl, method, None, e.stderr or e.stdout, timeout=timeout)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("JPEFT_BENCH_RESULT ")), None)
    if line is None:
        return job_failure(impl, method, proc.returncode, proc.stderr or proc.stdout)
    return json.loads(line.split(" ", 1)[1])


def run(cfg: BenchConfig, *, peft: bool = False, peft_modes: tuple[str, ...] = ("eager", "compiled"),
        timeout: float = 1800, on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every method of ``cfg`` (and HF PEFT's ``peft_modes`` runs if ``peft``), one
    subprocess each. A failed or timed-out job is recorded with its ``error`` and the
    others still run; ``on_result(results_so_far)`` is called after each job (write
    partial results there, so a long run keeps what it measured)."""
    results: list[dict] = []
    for impl, method in jobs(cfg, peft, peft_modes):
        r = _run_job(impl, method, cfg, timeout)
        results.append(r)
        add_ratios(results)
        shown = (f"{r['step_ms']:9.1f} ms/step" if "step_ms" in r else
                 f"{r['xla_tflop_per_step']:9.4g} TFLOP/step" if r.get("xla_tflop_per_step") else f"FAILED: {r.get('error', 'no figure')}")
        print(f"  {impl:14s} {method:6s} {shown}", flush=True)
        if on_result:
            on_result(results)
    return results
