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
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

#: bf16 peak FLOP/s by device kind (substring of ``device_kind`` or torch's device name).
#: H100/H200: the ≈790 TFLOP/s the targets are stated against (experiments/PERF.md; the
#: datasheet's dense figure is 989); others: datasheet dense figures. ``peak_tflops`` overrides.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12, "A100": 312e12, "L4": 121e12, "RTX 3090": 71e12}

PROFILE_STEPS = 3

METHOD_ORDER = ("lora", "dora", "lokr", "oft", "boft", "shoft", "rhoft")
#: The Householder methods; with ``--peft`` they are compared with PEFT's HRA.
HOUSEHOLDER = ("shoft", "rhoft")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"  # a name of jpeft.models.NAMED_CONFIGS (a port), or linen:SIZE / nnx:SIZE
    batch: int = 16
    seq_len: int = 256
    methods: tuple[str, ...] = METHOD_ORDER
    targets: tuple[str, ...] | None = None  # regexes; None: Q/K/V
    compute_dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"  # frozen base weights; trainables are always float32
    warmup: int = 3
    steps: int = 10
    hparams: dict = dataclasses.field(default_factory=dict)  # {method: {name: value}}
    compile_only: bool = False  # compile at abstract shapes: XLA's FLOP and memory, no timing
    peak_tflops: float | None = None  # overrides PEAK_FLOPS for MFU
    remat: str = "none"  # jpeft.models.layers.REMAT_POLICIES
    profile_dir: str | None = None  # if set, PROFILE_STEPS more steps per run are traced there (trace_path)
    quantize: str | None = None  # also each method over the base quantized so (QLoRA: nf4, fp4, int8), impl "jpeft-nf4"
    mesh: str | None = None  # "data=2,fsdp=4" (jpeft.sharding): the step jitted for train.step_shardings on that mesh

    def __post_init__(self):
        for name in ("batch", "seq_len", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops!r}")
        if self.profile_dir and self.compile_only:
            raise ValueError("profile_dir traces timed steps and cannot be combined with compile_only")
        if self.mesh is not None:
            from jpeft import sharding

            sizes = sharding.parse_mesh(self.mesh)  # names the bad part
            rows = sharding.batch_divisor(sizes)
            if self.batch % rows:
                raise ValueError(f"batch={self.batch} does not split over the {rows} data-parallel positions "
                                 f"(data x fsdp) of the mesh {self.mesh}")
            if is_flax_model(self.model) and sizes.get("tp", 1) > 1:
                raise ValueError(f"a tp axis splits layers by the ports' names (jpeft.sharding.TP_RULES), which "
                                 f"{self.model!r}'s stock flax modules do not follow; use data and fsdp axes")
        from jpeft import core, train
        from jpeft import models
        from jpeft.models import layers, phi

        layers.check_remat(self.remat)
        flax_models = [f"{arch}:{size}" for arch in ("linen", "nnx") for size in phi.NAMED_CONFIGS]
        if self.model not in models.NAMED_CONFIGS and self.model not in flax_models:
            raise ValueError(f"model must be one of {sorted(models.NAMED_CONFIGS)} (jpeft's ports) or {flax_models} "
                             f"(a decoder of stock flax modules at that size), got {self.model!r}")
        if self.quantize is not None:
            from jpeft import quant

            if self.quantize not in quant.KINDS:
                raise ValueError(f"quantize must be one of {quant.KINDS}, got {self.quantize!r}")
            if is_flax_model(self.model):
                raise ValueError(f"quantize compares jpeft's ports' steps, not {self.model!r}'s")
        added = [m for m in self.methods if core.get_method(m).scope == "model"]
        if is_flax_model(self.model) and added:
            raise ValueError(f"{added} add computation at a model's hook points, which jpeft's ports have and "
                             f"{self.model!r} (stock flax modules) does not; bench them on a port")
        if is_flax_model(self.model) and self.remat != "none":
            raise ValueError(f"remat applies to jpeft's ports only, not to {self.model!r}")
        if is_flax_model(self.model) and self.targets and "lora" in self.methods:
            qwix_module_path(self.targets)  # the qwix LoRA route must adapt the same layers
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in train.COMPUTE_DTYPES:
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        for method in (*self.methods, "hra"):
            core.make_config(method, **self.hparams.get(method, {}))  # names the bad method or value
        extra = set(self.hparams) - set(self.methods) - {"hra"}  # hra: the PEFT baseline's r
        if extra:
            raise ValueError(f"hyper-parameters given for {sorted(extra)}, which are not among the methods {list(self.methods)}")


#: Named configurations without a checkpoint, there for shapes-only benches (``compile_only``).
SHAPES_ONLY_MODELS = ("phi-7b",)


def mesh_devices(mesh: str) -> int:
    """How many devices ``mesh`` (``"data=2,fsdp=4"``) spans: the product of its sizes."""
    from jpeft import sharding

    return math.prod(sharding.parse_mesh(mesh).values())


def is_flax_model(model: str) -> bool:
    """``linen:SIZE`` / ``nnx:SIZE``: the decoder of stock flax modules at a Phi size."""
    return model.split(":")[0] in ("linen", "nnx") and ":" in model


def model_flops_per_step(config, tokens: int, seq_len: int) -> float:
    """``4·N·T`` for the matmul parameters (embedding lookup excluded) + causal attention."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    n_matmul = layers * (4 * h * h + 2 * h * inter) + h * vocab
    attention = 8.0 * layers * tokens * seq_len * h / 2  # causal: half of QKᵀ and PV
    return 4.0 * n_matmul * tokens + attention


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The device's bf16 peak FLOP/s for MFU (``None``, and no MFU, for an unknown device)."""
    if override_tflops:
        return override_tflops * 1e12
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


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


def _port_step(cfg: BenchConfig, method: str, quantize: str | None = None):
    """Phi with ``method`` on its own ``jpeft.linear`` path, over a base quantized with
    ``quantize`` if given: ``(loss, trainable, frozen, trainable count, config)``."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft import core, train
    from jpeft import models

    config = models.config(cfg.model)
    model = models.make_model(config, cfg.compute_dtype, cfg.param_dtype, cfg.remat)
    targets = list(cfg.targets) if cfg.targets else None

    def build(key):
        params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        params = params if quantize is None else jpeft.quantize(params, quantize)
        return jpeft.apply(params, method, key=jax.random.fold_in(key, 1), **core.targets_for(method, targets, model),
                           **cfg.hparams.get(method, {}))

    # compile_only: shapes alone (jax.eval_shape), so a full-size model compiles on a laptop
    adapted = jax.eval_shape(build, jax.random.key(0)) if cfg.compile_only else build(jax.random.key(0))
    return train.lm_loss_fn(model), *jpeft.partition(adapted), jpeft.count_params(adapted)["trainable"], config


#: Routes of a model made of stock flax modules (``--model linen:SIZE`` / ``nnx:SIZE``):
#: ``wrap`` (jpeft.wrap, factored), ``materialize`` (jpeft.materialize inside the loss),
#: ``qwix`` (qwix's LoRA), ``full`` (full fine-tuning).
FLAX_ROUTES = ("wrap", "materialize", "qwix", "full")


def qwix_module_path(targets: list[str] | tuple[str, ...]) -> str:
    """qwix's ``module_path`` regex for jpeft kernel ``targets``: qwix matches the path of
    the module owning a kernel, so each target must end in ``/kernel`` (refused otherwise,
    as qwix's LoRA would then adapt other layers than jpeft's)."""
    bad = [t for t in targets if not t.endswith("/kernel")]
    if bad:
        raise ValueError(f"the qwix route needs targets ending in '/kernel' (qwix selects modules, not parameters), got {bad}")
    return "|".join(f"(?:{t.removesuffix('/kernel')})" for t in targets)


def _flax_step(cfg: BenchConfig, route: str, method: str):
    """A stock-flax decoder (:mod:`jpeft.models.flax_decoder`) trained by ``route``:
    ``(loss, trainable, frozen, trainable count, config)``."""
    import jax

    import jpeft
    from jpeft import train
    from jpeft.models import flax_decoder, phi

    arch, size = cfg.model.split(":")
    config = phi.config(size)
    dcfg = flax_decoder.DecoderConfig.like(config)
    apply_fn, params = flax_decoder.build(arch, dcfg, jax.random.key(0), cfg.compute_dtype, cfg.param_dtype,
                                          abstract=cfg.compile_only)
    hp = dataclasses.asdict(jpeft.core.make_config(method, **cfg.hparams.get(method, {})))
    targets = list(cfg.targets) if cfg.targets else list(flax_decoder.TARGETS)
    nones = lambda tree: jax.tree_util.tree_map(lambda _: None, tree)  # noqa: E731

    def token_loss(logits, batch):
        return train.token_loss(logits, batch["targets"], batch["loss_mask"])

    if route in ("wrap", "materialize"):
        adapt = lambda p: jpeft.apply(p, method, key=jax.random.key(1), targets=targets, layout=flax_decoder.LAYOUT, **hp)  # noqa: E731
        adapted = jax.eval_shape(adapt, params) if cfg.compile_only else adapt(params)
        trainable, frozen = jpeft.partition(adapted)
        if route == "wrap":
            loss = lambda p, batch, key: token_loss(jpeft.wrap(apply_fn, dropout_key=key)(p, batch["input_ids"]), batch)  # noqa: E731
        else:  # no dropout exists on this route
            loss = lambda p, batch, key: token_loss(apply_fn(jpeft.materialize(p), batch["input_ids"]), batch)  # noqa: E731
        return loss, trainable, frozen, jpeft.count_params(adapted)["trainable"], config
    if route == "full":
        return (lambda p, batch, key: token_loss(apply_fn(p, batch["input_ids"]), batch)), params, nones(params), \
            sum(x.size for x in jax.tree_util.tree_leaves(params)), config
    # qwix's LoRA on the same model: the same rank, alpha, dropout and targets. qwix
    # creates its adapters in the base weights' dtype (bf16 with a bf16 base), jpeft in float32.
    import qwix

    from flax import nnx

    rule = qwix.LoraRule(module_path=qwix_module_path(targets), rank=hp["r"], alpha=hp["alpha"], dropout=hp["dropout"])
    provider = qwix.LoraProvider([rule])
    ids = jax.numpy.zeros((1, 4), "int32")
    if arch == "linen":
        lora_model = qwix.apply_lora_to_model(flax_decoder.linen_module(dcfg, cfg.compute_dtype, cfg.param_dtype), provider)
        init = lambda k: lora_model.init(k, ids)["params"]  # noqa: E731
        variables = jax.eval_shape(init, jax.random.key(0)) if cfg.compile_only else init(jax.random.key(0))

        def forward(p, ids, key):
            return lora_model.apply({"params": p}, ids, rngs=None if key is None else {"dropout": key})
    else:  # NNX: qwix rewrites the module by running it once; its dropout draws from `qwix_rngs`
        make = lambda: qwix.apply_lora_to_model(  # noqa: E731
            flax_decoder.nnx_module(dcfg, jax.random.key(0), cfg.compute_dtype, cfg.param_dtype), provider, ids,
            rngs=nnx.Rngs(1))
        graphdef, variables = nnx.split(nnx.eval_shape(make) if cfg.compile_only else make())

        def forward(p, ids, key):
            model = nnx.merge(graphdef, p)
            if key is not None:
                model.set_attributes(qwix_rngs=nnx.Rngs(dropout=key))
            return model(ids)
    is_lora = lambda path, _: "_lora_" in jpeft.core.path_str(path)  # noqa: E731
    trainable = jax.tree_util.tree_map_with_path(lambda p, x: x if is_lora(p, x) else None, variables)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if is_lora(p, x) else x, variables)
    loss = lambda p, batch, key: token_loss(forward(p, batch["input_ids"], key), batch)  # noqa: E731
    return loss, trainable, frozen, sum(x.size for x in jax.tree_util.tree_leaves(trainable)), config


def run_jpeft(cfg: BenchConfig, method: str, route: str = "jpeft") -> dict:
    """Compile (and unless ``compile_only``, time) one train step; runs in a worker.
    ``route`` ``jpeft``: the model's port (Phi or Llama); one of :data:`FLAX_ROUTES`: the stock-flax decoder."""
    import jax

    import jpeft
    from jpeft import sharding, train

    if route.startswith("jpeft"):  # "jpeft" or "jpeft-nf4": the port, the base quantized in the latter
        loss, trainable, frozen, n_trainable, config = _port_step(cfg, method, route.partition("-")[2] or None)
    else:
        loss, trainable, frozen, n_trainable, config = _flax_step(cfg, route, method)
    total = 1000  # the optimizer's (and AdaLoRA's budget schedule's) length
    tx = train.optimizer(train.TrainConfig(batch_size=cfg.batch, warmup_steps=10, compute_dtype=cfg.compute_dtype), total)
    # methods with training hooks (AdaLoRA's regularizer and rank budget) run them in the step, as jpeft.train does
    adapted = jpeft.combine(trainable, frozen) if route.startswith("jpeft") or route in ("wrap", "materialize") else {}
    hooks = train.method_hooks(adapted)
    if hooks:
        for h in hooks.values():
            adapted = h.prepare(adapted, total)
        trainable, frozen = jpeft.partition(adapted)
    make_state = lambda trainable: train.init_state(trainable, tx, 0, hooks)  # noqa: E731
    state = jax.eval_shape(make_state, trainable) if cfg.compile_only else make_state(trainable)
    make_batch = lambda: train.random_lm_batch(jax.random.key(2), cfg.batch, cfg.seq_len, config.vocab_size)  # noqa: E731
    batch = jax.eval_shape(make_batch) if cfg.compile_only else make_batch()
    shardings = mesh = None
    if cfg.mesh is not None:
        mesh = bench_mesh(cfg.mesh)
        shardings = train.step_shardings(state, frozen, mesh)
        if cfg.compile_only:  # abstract arguments carrying their placements: nothing is allocated
            state, frozen, batch = (with_shardings(tree, s) for tree, s in zip((state, frozen, batch), shardings))
        else:
            state, frozen, batch = (sharding.place(tree, s) for tree, s in zip((state, frozen, batch), shardings))
    step = train.make_train_step(loss, tx, 1, hooks, shardings)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start

    device = jax.devices()[0]
    device_name = f"{device.platform}:{getattr(device, 'device_kind', '')}"
    tokens = cfg.batch * cfg.seq_len
    flops = model_flops_per_step(config, tokens, cfg.seq_len)
    result = {"impl": route, "method": method, "device": device_name, "model_tflop_per_step": flops / 1e12,
              "compile_s": compile_s, "trainable": n_trainable, **compiled_analysis(compiled),
              **frozen_footprint(frozen, None if shardings is None else shardings[1])}
    if mesh is not None:  # XLA's memory figures above are then one device's program (SPMD)
        result.update(mesh=sharding.describe(mesh), devices=mesh.size, xla_flags=os.environ.get("XLA_FLAGS"))
    if cfg.compile_only:
        return result
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    times = timed_steps(one, cfg.warmup, cfg.steps)
    if cfg.profile_dir:
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                for _ in range(PROFILE_STEPS):
                    one()
            (trace,) = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))
            os.makedirs(cfg.profile_dir, exist_ok=True)
            shutil.move(trace, trace_path(cfg, route, method))
    stats = device.memory_stats() or {}
    result.update(timing_fields(times, tokens, flops, peak_flops(device_name, cfg.peak_tflops)))
    result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
    return result


def bench_mesh(mesh: str):
    """The mesh of ``mesh`` over this process's first devices, or a ValueError saying how
    many it needs (on a CPU the worker gets them from ``XLA_FLAGS``, :func:`worker_env`)."""
    import jax

    from jpeft import sharding

    need, devices = mesh_devices(mesh), jax.devices()
    if len(devices) < need:
        kind = devices[0].platform
        hint = ("" if kind != "cpu" else
                f"; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} should have made {need} CPU devices")
        raise ValueError(f"mesh {mesh} needs {need} devices, this machine has {len(devices)} {kind} device(s){hint}. "
                         f"Run it where there are {need} accelerators, or with JAX_PLATFORMS=cpu for fake CPU "
                         f"devices (compile_only: XLA's per-device memory without running)")
    return sharding.make_mesh(mesh, devices[:need])


def with_shardings(tree, shardings):
    """``tree``'s arrays as ``jax.ShapeDtypeStruct`` carrying the matching shardings (a
    tree like ``tree``, or one sharding for all)."""
    import jax

    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
    return jax.tree_util.tree_map(lambda x, s: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, shardings, is_leaf=lambda x: x is None)


def frozen_footprint(frozen, shardings=None) -> dict:
    """GiB of the frozen base (``frozen_gib``) and of what one device holds of it
    (``frozen_gib_per_device``) under ``shardings`` (a tree of ``NamedSharding`` matching
    ``frozen``; ``None``: one device holds it all), from shapes and specs alone: each
    array's bytes over the number of parts its spec splits it into (its shard's shape;
    :func:`jpeft.sharding.fsdp_specs` splits evenly, so every device holds the same)."""
    import jax
    import numpy as np

    nbytes = lambda shape, x: int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize  # noqa: E731
    total = sum(nbytes(x.shape, x) for x in jax.tree_util.tree_leaves(frozen))
    if shardings is None:
        return {"frozen_gib": total / 2**30, "frozen_gib_per_device": total / 2**30}
    held = jax.tree_util.tree_map(lambda x, s: nbytes(s.shard_shape(tuple(x.shape)), x), frozen, shardings)
    return {"frozen_gib": total / 2**30, "frozen_gib_per_device": sum(jax.tree_util.tree_leaves(held)) / 2**30}


#: Methods HF PEFT also has; its HRA is also timed as the Householder baseline of shoft/rhoft.
PEFT_METHODS = ("lora", "dora", "lokr", "oft", "boft", "hra", "loha", "ia3", "vera", "adalora", "prompt_tuning",
                "p_tuning", "prefix_tuning")
#: jpeft's LoRA init -> PEFT's ``init_lora_weights``
PEFT_LORA_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora"}


def peft_config(method: str, hparams: dict, target_modules: list[str]):
    """HF PEFT's config for the same hyper-parameters as jpeft's validated config of ``method``."""
    import peft

    from jpeft import core

    c = core.make_config(method, **hparams)
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_dora=method == "dora",
                               init_lora_weights=PEFT_LORA_INIT[c.init], use_rslora=c.rslora, target_modules=target_modules)
    if method == "lokr":
        return peft.LoKrConfig(r=c.r, alpha=c.alpha, decompose_factor=c.factor, target_modules=target_modules)
    if method == "oft":  # PEFT rotates inputs (jpeft's side="in"); same cost either side
        return peft.OFTConfig(r=0, oft_block_size=c.block_size, coft=False, use_cayley_neumann=c.neumann_terms is not None,
                              num_cayley_neumann_terms=c.neumann_terms or 5, target_modules=target_modules)
    if method == "hra":
        return peft.HRAConfig(r=c.r, target_modules=target_modules)
    if method == "boft":
        return peft.BOFTConfig(boft_block_size=c.block_size, boft_n_butterfly_factor=c.n_butterfly, target_modules=target_modules)
    if method == "loha":
        return peft.LoHaConfig(r=c.r, alpha=c.alpha, target_modules=target_modules)
    if method == "ia3":
        return peft.IA3Config(target_modules=target_modules, feedforward_modules=target_modules if c.feedforward else [])
    if method == "vera":
        return peft.VeraConfig(r=c.r, d_initial=c.d_init, vera_dropout=c.dropout, target_modules=target_modules)
    if method == "adalora":  # the step alone: the rank budget schedule runs between steps
        return peft.AdaLoraConfig(init_r=c.r, target_r=c.target_r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                  orth_reg_weight=c.orth_reg_weight, total_step=c.total_step or 1000, target_modules=target_modules)
    prompt = dict(task_type="CAUSAL_LM", num_virtual_tokens=getattr(c, "num_virtual_tokens", None))
    if method == "prompt_tuning":  # random init: a text init needs PEFT a tokenizer, and costs the same
        return peft.PromptTuningConfig(**prompt)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(**prompt, encoder_reparameterization_type=c.encoder.upper(),
                                        encoder_hidden_size=c.encoder_hidden_size, encoder_num_layers=c.encoder_num_layers)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(**prompt, prefix_projection=c.projection, encoder_hidden_size=c.encoder_hidden_size)
    raise ValueError(f"HF PEFT has no counterpart of {method!r}; it has {PEFT_METHODS}")


def hf_target_modules(cfg: BenchConfig) -> list[str]:
    """The transformers module names of the kernels jpeft's ``cfg.targets`` select, so
    PEFT adapts exactly the same layers."""
    import jpeft
    from jpeft import models
    from jpeft.models import layers

    shapes = layers.param_shapes(models.make_model(models.config(cfg.model)))
    paths = jpeft.match_targets(shapes, list(cfg.targets) if cfg.targets else None)
    return [layers.hf_name(tuple(p.split("/")))[0].removesuffix(".weight") for p in paths]


def run_peft(cfg: BenchConfig, method: str, compiled: bool) -> dict:
    """Time HF PEFT (torch) on the same configuration and hyper-parameters (adapter
    dropout included): fp32 master weights, bf16 autocast, AdamW."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from jpeft import models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = f"{device}:{torch.cuda.get_device_name() if device == 'cuda' else platform.processor()}"
    torch.manual_seed(0)
    config = models.config(cfg.model)
    model = AutoModelForCausalLM.from_config(config).to(device)
    model = peft.get_peft_model(model, peft_config(method, cfg.hparams.get(method, {}), hf_target_modules(cfg)))
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
    one()  # the first step compiles under torch.compile
    compile_s = time.perf_counter() - start
    times = timed_steps(one, cfg.warmup, cfg.steps)
    impl = "peft-compiled" if compiled else "peft-eager"
    if cfg.profile_dir:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(PROFILE_STEPS):
                one()
        os.makedirs(cfg.profile_dir, exist_ok=True)
        prof.export_chrome_trace(trace_path(cfg, impl, method))
    tokens = cfg.batch * cfg.seq_len
    flops = model_flops_per_step(config, tokens, cfg.seq_len)
    return {
        "impl": impl,
        "method": method,
        "device": device_name,
        "model_tflop_per_step": flops / 1e12,
        **timing_fields(times, tokens, flops, peak_flops(device_name, cfg.peak_tflops)),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "compile_s": compile_s,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _worker(payload: str) -> None:
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


if __name__ == "__main__":
    _worker(sys.argv[1])
