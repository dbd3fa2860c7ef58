"""Training-step benchmark: jpeft methods (and optionally HF PEFT, eager and compiled).

Each configuration runs in its own subprocess, so compile caches and the device's peak
memory counter start clean. A jpeft worker builds the model with random weights, applies
the method, compiles the real train step (AdamW over the trainable partition), runs
``warmup`` steps, then times ``steps`` steps one by one (each synchronized with
``block_until_ready``) and reports the median and quartiles. It also records what XLA's
compiled step says of itself: its FLOP count and its memory (arguments + outputs −
donated + temporaries), which a CPU can compute at full Phi-1.5 size with
``compile_only`` (nothing is allocated or run) to check the cost model and the memory
budget without a GPU.

Model FLOP utilization counts the work a frozen-base PEFT step must do, forward plus
backward to activations: ``4 · N · T`` for the ``N`` matmul parameters and ``T`` tokens,
plus attention's ``8 · L · T · S · d / 2`` (causal), over the device's bf16 peak
(``experiments/PERF.md``, "Cost model"). HF PEFT runs use fp32 master weights under bf16
autocast, as PERF.md's reference figures were measured, on exactly the modules jpeft targets.

With a ``mesh`` (``"data=2,fsdp=4"``, :mod:`jpeft.sharding`) the step is jitted for
:func:`jpeft.train.step_shardings` on it, as ``jpeft train --mesh`` runs it: compiled at
abstract arguments carrying those shardings (``compile_only``) or run on arrays placed on
them. An SPMD executable is one device's program, so XLA's FLOP and memory figures are then
per device; ``frozen_gib_per_device`` is what the shardings put of the frozen base on one
device, from shapes and specs alone. On a CPU the worker gets the mesh's devices as fake
host devices (``XLA_FLAGS``, :func:`worker_env`), so the per-device memory of a 7B-class
step on 8 devices can be compiled on a laptop.

The package, bottom up: :mod:`~jpeft.bench.config` (what runs, the cost model),
:mod:`~jpeft.bench.timing` (timed steps, XLA's figures), :mod:`~jpeft.bench.jpeft_runs` and
:mod:`~jpeft.bench.peft_runs` (the two sides' steps), :mod:`~jpeft.bench.tables` (ratios,
table, figure, ``bench.json``), :mod:`~jpeft.bench.runner` (jobs and worker processes).
Importing it adds nothing heavy to ``import jpeft`` (no flax, torch or model): each run imports what it needs.
"""

from jpeft.bench.config import (
    HOUSEHOLDER,
    METHOD_ORDER,
    PEAK_FLOPS,
    SHAPES_ONLY_MODELS,
    BenchConfig,
    is_flax_model,
    mesh_devices,
    model_flops_per_step,
    peak_flops,
    qwix_module_path,
)
from jpeft.bench.timing import PROFILE_STEPS, compiled_analysis, timed_steps, timing_fields, trace_path
from jpeft.bench.jpeft_runs import FLAX_ROUTES, bench_mesh, frozen_footprint, run_jpeft, with_shardings
from jpeft.bench.peft_runs import PEFT_LORA_INIT, PEFT_METHODS, hf_target_modules, peft_config, run_peft
from jpeft.bench.tables import add_ratios, environment, plot, table, write_outputs
from jpeft.bench.runner import HOST_DEVICES_FLAG, _run_job, job_failure, jobs, run, worker, worker_env  # noqa: F401 (_run_job: one job, for tests)

__all__ = [
    "BenchConfig",
    "FLAX_ROUTES",
    "HOST_DEVICES_FLAG",
    "HOUSEHOLDER",
    "METHOD_ORDER",
    "PEAK_FLOPS",
    "PEFT_LORA_INIT",
    "PEFT_METHODS",
    "PROFILE_STEPS",
    "SHAPES_ONLY_MODELS",
    "add_ratios",
    "bench_mesh",
    "compiled_analysis",
    "environment",
    "frozen_footprint",
    "hf_target_modules",
    "is_flax_model",
    "job_failure",
    "jobs",
    "mesh_devices",
    "model_flops_per_step",
    "peak_flops",
    "peft_config",
    "plot",
    "qwix_module_path",
    "run",
    "run_jpeft",
    "run_peft",
    "table",
    "timed_steps",
    "timing_fields",
    "trace_path",
    "with_shardings",
    "worker",
    "worker_env",
    "write_outputs",
]
