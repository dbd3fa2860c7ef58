"""Measuring one compiled or eager step, the same way for jpeft and HF PEFT: timed steps,
their median and quartiles, XLA's own FLOP and memory figures, where profiles go.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from jpeft.bench.config import BenchConfig


PROFILE_STEPS = 3


def compiled_analysis(compiled) -> dict:
    """XLA's own account of a compiled step: FLOP and memory (arguments + outputs −
    donated aliases + temporaries, in GiB)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    estimate = None
    if mem is not None:
        estimate = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                    + mem.temp_size_in_bytes) / 2**30
    return {"xla_tflop_per_step": cost["flops"] / 1e12 if cost and "flops" in cost else None,
            "memory_estimate_gib": estimate,
            "argument_gib": mem.argument_size_in_bytes / 2**30 if mem is not None else None,
            "temp_gib": mem.temp_size_in_bytes / 2**30 if mem is not None else None}


def trace_path(cfg: BenchConfig, impl: str, method: str) -> str:
    """Where a run's profile goes: one Chrome-trace file (open it in Perfetto)."""
    return os.path.join(cfg.profile_dir, f"{impl}-{method}.trace.json.gz")


def timed_steps(fn: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` (which must synchronize), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timing_fields(times: list[float], tokens: int, flops: float, peak: float | None) -> dict:
    """Median step time with its quartiles, tokens/s and model FLOP utilization."""
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (median,) * 3
    return {
        "step_ms": 1e3 * median,
        "step_ms_q1": 1e3 * q1,
        "step_ms_q3": 1e3 * q3,
        "step_ms_all": [1e3 * t for t in times],
        "tokens_per_s": tokens / median,
        "mfu": flops / median / peak if peak else None,
    }
