"""jpeft's side of the benchmark: the train step of a port (Phi, Llama) with a method, or of
a decoder of stock flax modules by one of :data:`FLAX_ROUTES`, compiled and timed in a
worker, on one device or a mesh.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import tempfile
import time

from jpeft.bench.config import BenchConfig, mesh_devices, model_flops_per_step, peak_flops, qwix_module_path
from jpeft.bench.timing import PROFILE_STEPS, compiled_analysis, timed_steps, timing_fields, trace_path


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


def _flax_step(cfg: BenchConfig, route: str, method: str):
    """A stock-flax decoder (:mod:`jpeft.models.flax_decoder`) trained by ``route``:
    ``(loss, trainable, frozen, trainable count, config)``."""
    import jax

    import jpeft
    from jpeft import train
    from jpeft.methods.registry import make_config
    from jpeft.models import flax_decoder, phi
    from jpeft.tree import path_str

    arch, size = cfg.model.split(":")
    config = phi.config(size)
    dcfg = flax_decoder.DecoderConfig.like(config)
    apply_fn, params = flax_decoder.build(arch, dcfg, jax.random.key(0), cfg.compute_dtype, cfg.param_dtype,
                                          abstract=cfg.compile_only)
    hp = dataclasses.asdict(make_config(method, **cfg.hparams.get(method, {})))
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
    is_lora = lambda path, _: "_lora_" in path_str(path)  # noqa: E731
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
