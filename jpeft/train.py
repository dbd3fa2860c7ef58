"""Jitted fine-tuning over partitioned parameters (thesis Table A.1 defaults).

Only the trainable half of ``jpeft.partition(adapted)`` is differentiated, updated and
kept in the optimizer state; the frozen half (the base model, possibly bf16) is an
argument of the step that is never copied. One step is a ``lax.scan`` over
``grad_accum`` micro-batches, so gradient accumulation costs no extra compile. Data
parallelism on a mesh of :mod:`jpeft.sharding` (default: every device on a ``"data"``
axis): batches are split along ``data`` and ``fsdp``, the frozen base is split along
``fsdp`` (and ``tp``), the trainables and the optimizer state are replicated, and XLA
inserts the gathers and the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jpeft import checkpoint, core, counter_rng, data, optim, sharding
from jpeft.methods.registry import get_method
from jpeft.node import is_node

PyTree = Any
Array = jax.Array


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
#: ``TrainConfig.optimizer`` values: AdamW, or GaLore (:mod:`jpeft.optim`) around the same AdamW
OPTIMIZERS = ("adamw", "galore")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults are the thesis' Table A.1 (AdamW, lr 2e-4,
    linear schedule with 100 warm-up steps, batch 16, 3 epochs, adapter dropout 0.05 —
    the dropout itself is a method hyper-parameter).

    ``optimizer="galore"`` runs the same AdamW inside GaLore (:func:`optimizer`): the
    ``galore_*`` fields are its rank, projector refresh interval and scale (GaLore's
    defaults, 128 / 200 / 0.25), unused with ``"adamw"``."""

    learning_rate: float = 2e-4
    warmup_steps: int = 100
    epochs: int = 3
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # what each layer keeps for backward: none / dots / full (jpeft.models.phi.REMAT_POLICIES)
    seed: int = 0
    optimizer: str = "adamw"  # adamw / galore (OPTIMIZERS)
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25

    def __post_init__(self):
        from jpeft.models.layers import check_remat

        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        check_remat(self.remat)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("galore_rank", "galore_update_proj_gap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        scale = self.galore_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"galore_scale must be a positive finite number, got {scale!r}")


def schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then linear decay to 0 at ``total_steps``."""
    warmup = min(config.warmup_steps, total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
            optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping (as the HF Trainer the thesis used).

    ``config.optimizer == "galore"``: the same chain with optax's Adam run inside
    :func:`jpeft.optim.galore` (rank ``galore_rank``, projectors refreshed every
    ``galore_update_proj_gap`` updates, ``galore_scale``), i.e. ``clip -> galore(scale_by_adam)
    -> add_decayed_weights -> scale_by_learning_rate``, which is ``optax.adamw``'s own chain.
    GaLore projects the 2-D trainable leaves whose smaller side exceeds the rank (its default
    selection, :func:`jpeft.optim.projected_leaves`): the kernels of ``full`` nodes, not
    adapter factors of rank <= ``galore_rank`` (LoRA's ``a``, ``b``), vectors or small
    matrices, which get exactly AdamW's update. Weight decay is AdamW's (the old weight,
    ``-lr·(u + λW)``), not galore-torch's decay of the stepped weight
    (:func:`jpeft.optim.galore_adamw`, which also uses transformers' ``ε = 1e-6``).
    """
    lr = schedule(config, total_steps)
    if config.optimizer == "galore":
        tx = optax.chain(
            optim.galore(config.galore_rank, config.galore_update_proj_gap, config.galore_scale,
                         inner=optax.scale_by_adam()),
            optax.add_decayed_weights(config.weight_decay),
            optax.scale_by_learning_rate(lr),
        )
    else:
        tx = optax.adamw(lr, weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return tx
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the frozen weights and the data position."""

    step: Array
    trainable: PyTree
    opt_state: PyTree
    rng: Array  # raw uint32 data of a jpeft.counter_rng key, so checkpoints store plain arrays
    hooks: PyTree = ()  # {method: state} of the methods with training hooks (AdaLoRA's importance)


def method_hooks(adapted: PyTree) -> dict[str, Any]:
    """``{method name: hooks}`` for the methods of ``adapted``'s nodes that have training
    hooks (:attr:`jpeft.methods.base.Method.training`, :class:`jpeft.methods.base.Training`:
    AdaLoRA's regularizer and rank budget)."""
    names = sorted({x.method for x in jax.tree_util.tree_leaves(adapted, is_leaf=is_node) if is_node(x)})
    hooks = {name: get_method(name).training for name in names}
    return {name: h for name, h in hooks.items() if h is not None}


def init_state(trainable: PyTree, tx: optax.GradientTransformation, seed: int, hooks: dict | None = None) -> TrainState:
    """Step 0. The trainables are copied: the train step donates its state, and the
    caller's arrays must survive it. ``hooks`` (:func:`method_hooks`) add their states."""
    trainable = jax.tree_util.tree_map(lambda x: x.copy(), trainable)
    hook_states = {name: h.init(trainable) for name, h in (hooks or {}).items()}
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key_data(counter_rng.key(seed)),
                      hook_states)


def target_logprobs(logits: Array, targets: Array) -> Array:
    """``log p(targets)`` per position, in float32.

    optax's ``logit[target] - logsumexp(logits)`` never forms the (batch, length, vocab)
    log-softmax, whose float32 copy is the step's largest activation after the logits.
    """
    labels = targets.astype(jnp.int32)
    return -optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def token_loss(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Summed negative log-likelihood of ``targets`` where ``mask`` is set, in float32,
    and the number of such tokens."""
    mask = mask.astype(jnp.float32)
    return -jnp.sum(target_logprobs(logits, targets) * mask), jnp.sum(mask)


def prompt_mask(batch: dict) -> Array:
    """The prompt tokens of each row: attended tokens up to the one that predicts the first
    answer token (``loss_mask`` marks answer tokens of ``targets``, which are the inputs
    shifted by one). What position-based interventions (LoReFT's "first/last k of the
    prompt") count within, in training and in evaluation alike."""
    answer = batch["loss_mask"].astype(jnp.int32)
    before_answer = (jnp.cumsum(answer, axis=-1) - answer) == 0
    return batch["attention_mask"].astype(bool) & before_answer


def lm_loss_fn(model) -> Callable:
    """``loss(params, batch, dropout_key) -> (sum_nll, tokens)`` for a causal LM.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``targets`` (the next tokens,
    aligned with ``input_ids``) and ``loss_mask`` (1 on answer tokens of ``targets``).
    """

    def loss(params, batch, dropout_key):
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            deterministic=dropout_key is None,
            rngs=None if dropout_key is None else {"dropout": dropout_key},
            prompt_mask=prompt_mask(batch),
        )
        return token_loss(logits, batch["targets"], batch["loss_mask"])

    return loss


def random_lm_batch(key: Array, batch_size: int, seq_len: int, vocab_size: int) -> dict:
    """A batch of uniform random tokens in the train step's format, every token a target
    (for benchmarks and smoke runs, where the data does not matter)."""
    ids = jax.random.randint(key, (batch_size, seq_len), 0, vocab_size, jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "targets": jnp.roll(ids, -1, axis=1),
            "loss_mask": jnp.ones(ids.shape, jnp.float32)}


def make_train_step(loss: Callable, tx: optax.GradientTransformation, grad_accum: int,
                    hooks: dict | None = None, shardings: tuple | None = None) -> Callable:
    """A jitted ``step(state, frozen, batch) -> (state, metrics)``.

    ``batch`` arrays have a leading ``batch_size`` axis that is split into ``grad_accum``
    micro-batches; gradients are summed over micro-batches and divided by the number of
    answer tokens of the whole batch, so the update does not depend on ``grad_accum``.

    ``hooks`` (:func:`method_hooks`), inside the same jitted step: each one's regularizer
    is added to the token-mean loss once per step (its gradient to the gradients, logged
    as ``regularizer``), and after the optimizer update each one's ``after_step`` sees the
    new trainables and the gradients (AdaLoRA prunes ranks there); ``state.hooks`` carries
    their states.

    ``shardings`` (:func:`step_shardings`): the placements of ``(state, frozen, batch)``;
    the step is compiled for them and returns its state on the same ones (metrics
    replicated), so the frozen base is never gathered whole outside the step and a
    step's output feeds the next without a copy.
    """
    hooks = dict(hooks or {})

    def regularizer(trainable):
        return sum((h.regularizer(trainable) for h in hooks.values()), jnp.zeros((), jnp.float32))

    def step(state: TrainState, frozen: PyTree, batch: dict) -> tuple[TrainState, dict]:
        base_key = counter_rng.wrap(state.rng)  # cheap dropout masks (jpeft.counter_rng)
        micro = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

        def objective(trainable, mb, key):
            return loss(core.combine(trainable, frozen), mb, key)

        def accumulate(carry, inputs):
            grads, nll, tokens = carry
            i, mb = inputs
            key = jax.random.fold_in(jax.random.fold_in(base_key, state.step), i)
            (mb_nll, mb_tokens), g = jax.value_and_grad(objective, has_aux=True)(state.trainable, mb, key)
            grads = jax.tree_util.tree_map(jnp.add, grads, g)
            return (grads, nll + mb_nll, tokens + mb_tokens), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        (grads, nll, tokens), _ = jax.lax.scan(
            accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(grad_accum), micro)
        )
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        metrics = {}
        if hooks:
            reg, reg_grads = jax.value_and_grad(regularizer)(state.trainable)
            grads = jax.tree_util.tree_map(jnp.add, grads, reg_grads)
            metrics["regularizer"] = reg
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        hook_states = dict(state.hooks)
        for name, h in hooks.items():
            trainable, hook_states[name] = h.after_step(state.hooks[name], trainable, grads, state.step + 1)
            metrics.update({f"{name}_{k}": v for k, v in h.metrics(hook_states[name], trainable).items()})
        metrics = {"loss": nll / denom, "tokens": tokens, "grad_norm": optax.global_norm(grads), **metrics}
        return TrainState(state.step + 1, trainable, opt_state, state.rng, hook_states if hooks else state.hooks), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sharding, frozen_sharding, batch_sharding = shardings
    return jax.jit(step, in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(batch_sharding.mesh)), donate_argnums=(0,))


def step_shardings(state: TrainState, frozen: PyTree, mesh: Mesh) -> tuple[PyTree, PyTree, Any]:
    """``(state, frozen, batch)`` placements on ``mesh``: the state replicated (the
    trainables are, so the optimizer state follows them), the frozen half by
    :func:`jpeft.sharding.fsdp_specs` (split along the mesh's ``fsdp`` and ``tp`` axes
    where it has them), batches by :func:`jpeft.sharding.data_spec`."""
    axes = mesh.axis_names
    frozen_sharding = sharding.fsdp_specs(frozen, mesh, axis="fsdp" if "fsdp" in axes else None,
                                          tp_axis="tp" if "tp" in axes else None)
    state_sharding = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), state)
    return state_sharding, frozen_sharding, sharding.data_spec(mesh)


def make_eval_loss(loss: Callable) -> Callable:
    """A jitted ``(trainable, frozen, batch) -> (sum_nll, tokens)`` without dropout."""
    return jax.jit(lambda trainable, frozen, batch: loss(core.combine(trainable, frozen), batch, None))


# ----------------------------------------------------------------------- the loop


def fit(
    model,
    adapted: PyTree,
    encoded,
    config: TrainConfig,
    run_dir: str,
    *,
    max_steps: int | None = None,
    stop_at: int | None = None,
    checkpoint_every: int = 100,
    log_every: int = 10,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> tuple[PyTree, list[dict]]:
    """Train ``adapted`` on ``encoded`` pairs (from :func:`jpeft.data.encode_pairs`).

    Resumes from the latest checkpoint in ``run_dir/checkpoints`` if there is one; the
    schedule covers ``max_steps`` (default ``epochs × steps_per_epoch``) and the data
    stream is positioned by (epoch, batch), so a resumed run continues the exact
    trajectory. ``stop_at`` ends the run early (after checkpointing) at that step. A
    crash or Ctrl-C checkpoints the last completed step before re-raising. Methods with
    training hooks (:func:`method_hooks`; AdaLoRA's regularizer and rank budget) run them in
    the jitted step, their state checkpointed with the run, after filling in what depends on
    the run (AdaLoRA's ``total_step``: the schedule's steps, unless given). With
    ``config.optimizer == "galore"`` the projectors and GaLore's count are part of the
    optimizer state, so they are checkpointed and a resumed run refreshes on the same steps;
    a warning says when GaLore projects no trainable leaf (all plain AdamW). Logs go to
    ``run_dir/log.jsonl``; the final adapter to ``run_dir/adapter``.

    ``mesh`` (:func:`jpeft.sharding.make_mesh`; default: data parallelism over every
    device): batches are split over its ``data`` and ``fsdp`` axes, the frozen base over
    ``fsdp`` and ``tp`` (:func:`step_shardings`); checkpoints are saved sharded and restored
    onto this run's mesh, whichever mesh wrote them. With several processes
    (:func:`jpeft.sharding.initialize`) every process calls this with the same arguments;
    process 0 alone writes the log, the checkpoints' metadata and the adapter.
    Returns the trained adapted tree (trainables on the host, the frozen base as placed on
    the mesh) and the logged records.
    """
    os.makedirs(run_dir, exist_ok=True)
    per_epoch = data.steps_per_epoch(len(encoded), config.batch_size, drop_last=True)
    if per_epoch == 0:
        raise ValueError(f"{len(encoded)} training sequences do not fill one batch of {config.batch_size}")
    total = max_steps or config.epochs * per_epoch
    mesh = sharding.auto_axes(mesh or sharding.make_mesh())
    parts = sharding.batch_divisor(mesh)
    if (config.batch_size // config.grad_accum) % parts:
        raise ValueError(f"the micro-batch of {config.batch_size // config.grad_accum} rows (batch_size="
                         f"{config.batch_size} / grad_accum={config.grad_accum}) does not split over the "
                         f"{parts} data-parallel positions of the mesh {sharding.describe(mesh)}")
    primary = sharding.is_primary()
    hooks = method_hooks(adapted)
    for h in hooks.values():  # run-dependent hyper-parameters (AdaLoRA's total_step)
        adapted = h.prepare(adapted, total)
    trainable, frozen = core.partition(adapted)
    if config.optimizer == "galore" and not any(jax.tree_util.tree_leaves(optim.projected_leaves(trainable, config.galore_rank))):
        warnings.warn(f"optimizer 'galore' projects no trainable leaf (none is a matrix with both sides > "
                      f"galore_rank={config.galore_rank}): every leaf gets plain AdamW", stacklevel=2)
    tx = optimizer(config, total)
    state = init_state(trainable, tx, config.seed, hooks)
    shardings = step_shardings(state, frozen, mesh)
    # every leaf committed to its place (the step counter, the RNG and optax's counts too):
    # the step's outputs are, and inputs placed otherwise would compile the step again
    state, frozen = sharding.place(state, shardings[0]), sharding.place(frozen, shardings[1])
    saver = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"))
    if saver.latest_step() is not None:
        state, _ = saver.restore(state)  # onto the template's shardings, whatever mesh wrote it
    step_fn = make_train_step(lm_loss_fn(model), tx, config.grad_accum, hooks, shardings)
    end = min(total, stop_at) if stop_at is not None else total
    start = int(state.step)
    records: list[dict] = []
    bar = tqdm(total=end, initial=start, disable=not (progress and primary), desc="train", unit="step")
    log = open(os.path.join(run_dir, "log.jsonl"), "a") if primary else None

    def save(step_state):
        saver.save(int(step_state.step), step_state, {"step": int(step_state.step), "total_steps": total})

    step, stream, tokens, clock = start, None, 0.0, time.perf_counter()
    try:
        while step < end:
            epoch, position = divmod(step, per_epoch)
            if stream is None or position == 0:
                stream = data.batches(encoded, batch_size=config.batch_size, seed=config.seed, epoch=epoch, start=position)
            host_batch = next(stream)  # the same on every process; each places its devices' rows
            tokens += float(host_batch["attention_mask"].sum())
            state, metrics = step_fn(state, frozen, sharding.place(host_batch, shardings[2]))
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == end:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, **metrics, "lr": float(schedule(config, total)(step - 1)),
                          "tokens_per_s": tokens / max(now - clock, 1e-9)}
                tokens, clock = 0.0, now
                records.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % checkpoint_every == 0 or step == end:
                save(state)
    except BaseException:
        # Keep what was trained: checkpoint the last completed step (unless the failure
        # happened inside the step, whose donated input is then gone). Not with several
        # processes: saving is collective and the others are not saving; they stop when
        # this one exits (jpeft.sharding.initialize), and the run resumes from its last
        # periodic checkpoint.
        try:
            if jax.process_count() == 1 and int(state.step) > (saver.latest_step() or 0):
                save(state)
        except Exception as e:  # noqa: BLE001 - the original error matters more
            print(f"jpeft: could not checkpoint after the failure: {e}")
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
        saver.close()
    # the trainables to the host (they are replicated); the frozen base stays where it is
    trained = core.combine(jax.tree_util.tree_map(sharding.host_array, state.trainable), frozen)
    if step == total:
        checkpoint.save_adapter(os.path.join(run_dir, "adapter"), trained)
    return trained, records
