"""AdaLoRA: adaptive budget allocation (Zhang, Chen, Bukharin, Karampatziakis, He, Cheng,
Chen & Zhao, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023).

Paper notation, ``W`` (out × in): an SVD-shaped update whose ranks are pruned in training,

    W' = W + P Λ Q,    P ∈ R^{out×r},  Λ = diag(λ) ∈ R^{r×r},  Q ∈ R^{r×in},

with ``P``, ``Q`` kept near-orthogonal by ``R(P, Q) = ||PᵀP − I||_F + ||QQᵀ − I||_F`` added
to the loss. HF PEFT (``peft/tuners/adalora``) stores ``lora_B = P``, ``lora_E = λ`` (r × 1),
``lora_A = Q`` and scales the update by ``lora_alpha / (ranknum + 1e-5)``, ``ranknum`` the
initial rank (it stays ``r`` while ranks are pruned). On the Flax kernel ``K = Wᵀ`` (in, out):

    K' = K + s · (a ⊙ e) b,   a = Qᵀ (in × r),  e = λ (r),  b = Pᵀ (r × out),  s = α / (r + 1e-5).

Orientation: ``a`` acts on inputs, ``b`` on outputs; PEFT's ``lora_A.weight = aᵀ``,
``lora_E = e[:, None]``, ``lora_B.weight = bᵀ``. Hyper-parameters follow ``AdaLoraConfig``
except ``r``, PEFT's ``init_r`` (the initial rank; PEFT's own ``r`` is unused by AdaLoRA),
and ``alpha``/``dropout`` (PEFT's ``lora_alpha``/``lora_dropout``).

Init (PEFT's ``reset_lora_parameters``): ``e = 0``, ``a``, ``b`` ~ N(0, 0.02²), so ``K' = K``.
Trainable ``a``, ``e``, ``b`` (float32); frozen: the base ``kernel`` only.

Paths: factored ``y = x K + s · ((dropout(x) (a ⊙ e)) b)`` costs ``4·T·n·m + 6·T·r·(n+m)`` FLOP per
training step (LoRA's) and no weight gradient; materializing costs ``6·T·n·m + 6·n·r·m``, so
the factored path wins for every ``r < min(n, m)`` (Phi-1.5's 2048² Q/K/V at 4096 tokens:
0.68 of the materialized cost). Dropout (adapter input only, as PEFT) is factored-only.

Training (the rank budget): after every optimizer step, :func:`after_step` updates the
importance of every entry of ``a``, ``e``, ``b`` (paper eq. 8–9, PEFT's ``update_ipt``):

    I = |θ ⊙ ∇θ|,   Ī ← β1 Ī + (1−β1) I,   Ū ← β2 Ū + (1−β2) |I − Ī|,   score = Ī ⊙ Ū,

scores each triplet ``i`` as ``score(e_i) + mean_j score(a_ji) + mean_j score(b_ij)``
(PEFT's ``mask_to_budget``) and zeroes every ``e_i`` whose score is at or below the
``(init_budget − budget)``-th smallest of all triplets of the model. The budget
(:func:`budget_schedule`, PEFT's) stays ``r·L`` (L adapted matrices) for ``tinit`` steps, then
falls cubically to ``target_r·L`` at ``total_step − tfinal``, masking every ``deltaT`` steps;
there the allocation is final (importance reset) and re-applied after every later step.
:data:`TRAINING` holds these as pure functions of an explicit state that ``jpeft.train``
carries in its jitted step and its checkpoints, with :func:`regularizer` added to the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods import base
from jpeft.node import Node, is_node

Array = jax.Array
PyTree = Any
PARTS = ("a", "e", "b")
#: PEFT's ``ranknum + 1e-5``: the update is divided by the initial rank, never the pruned one
RANK_EPS = 1e-5
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class AdaloraConfig:
    """r: initial rank per matrix (PEFT's ``init_r``); target_r: average rank at the end;
    alpha: scale numerator (``s = alpha / (r + 1e-5)``, PEFT's ``lora_alpha``, default 8);
    dropout: rate on the adapter input in training (jpeft's 0.05 for every method; PEFT's
    default is 0); tinit, tfinal: steps without pruning at the start and at the end; deltaT:
    steps between two budget allocations; beta1, beta2: EMA factors of the importance and of
    its uncertainty; orth_reg_weight: weight of the orthogonality regularizer in the loss;
    total_step: training steps of the schedule (``None``: ``jpeft.train`` fills in the
    run's number of steps)."""

    r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - AdaLoraConfig's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_int("target_r", self.target_r)
        base.require(self.target_r <= self.r, f"target_r={self.target_r} exceeds the initial rank r={self.r}: AdaLoRA "
                                              "prunes ranks from r down to target_r on average; set target_r <= r")
        base.positive_float("alpha", self.alpha)
        base.probability("dropout", self.dropout)
        base.non_negative_int("tinit", self.tinit)
        base.non_negative_int("tfinal", self.tfinal)
        base.positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            base.require(not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < 1,
                         f"{name} must be in (0, 1), got {value!r}")
        base.require(not isinstance(self.orth_reg_weight, bool) and isinstance(self.orth_reg_weight, (int, float))
                     and self.orth_reg_weight >= 0, f"orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            base.positive_int("total_step", self.total_step)
            base.require(self.tinit + self.tfinal < self.total_step,
                         f"tinit={self.tinit} + tfinal={self.tfinal} leaves no budgeting phase in total_step="
                         f"{self.total_step} steps: lower tinit or tfinal, or train longer")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r + RANK_EPS)

    def check(self, shape: tuple[int, int]) -> None:
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")


# ------------------------------------------------------------------------ the layer


def init(key: Array, kernel: Array, config: AdaloraConfig) -> tuple[dict, dict]:
    n, m = kernel.shape
    k_a, k_b = jax.random.split(key)
    trainable = {
        "a": INIT_STD * jax.random.normal(k_a, (n, config.r), jnp.float32),
        "e": jnp.zeros((config.r,), jnp.float32),
        "b": INIT_STD * jax.random.normal(k_b, (config.r, m), jnp.float32),
    }
    return trainable, {"kernel": kernel}


def materialize(node: Node) -> Array:
    t = node.trainable
    return node.frozen["kernel"].astype(jnp.float32) + node.config.scale * ((t["a"] * t["e"]) @ t["b"])


def factored(x: Array, node: Node, dropout_key: Array | None = None) -> Array:
    t = node.trainable
    scaled_a = (t["a"] * t["e"]).astype(x.dtype)  # (Q ⊙ λ)ᵀ: in·r products, not T·r
    h = base.dropout(x, node.config.dropout, dropout_key) @ scaled_a
    update = (h @ t["b"].astype(x.dtype)) * jnp.asarray(node.config.scale, x.dtype)
    return x @ node.frozen["kernel"].astype(x.dtype) + update


def flops(node: Node, tokens: int) -> tuple[float, float]:
    return base.low_rank_flops(node, tokens, node.config.r)


# ------------------------------------------------------- regularizer and rank budget


def adalora_nodes(tree: PyTree) -> list[Node]:
    """The AdaLoRA nodes of ``tree`` in tree order (any registry name: found by config type)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_node)
    return [x for x in leaves if is_node(x) and isinstance(x.config, AdaloraConfig)]


def shared_config(nodes: list[Node]) -> AdaloraConfig:
    """The one config of the model's AdaLoRA nodes (one budget is shared by all of them)."""
    configs = {n.config for n in nodes}
    base.require(len(configs) == 1, f"AdaLoRA allocates one rank budget over all its nodes, which must share "
                                    f"one config; got {len(configs)}: {sorted(map(str, configs))[:3]}")
    return nodes[0].config


def _matrices(x: Array) -> int:
    """How many matrices a node array holds: one per layer of a stack (PEFT: one module each)."""
    return int(np.prod(x.shape[:-1], dtype=np.int64)) if x.ndim > 1 else 1


def budgets(nodes: list[Node]) -> tuple[int, int]:
    """``(init_budget, target_budget)``: PEFT's ``init_bgt`` (all initial ranks) and
    ``target_bgt`` (``target_r`` per adapted matrix)."""
    init_budget = sum(int(np.prod(n.trainable["e"].shape)) for n in nodes)
    target_budget = sum(n.config.target_r * _matrices(n.trainable["e"]) for n in nodes)
    return init_budget, target_budget


def budget_schedule(config: AdaloraConfig, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """``(budget, mask)`` at ``step``: PEFT's ``RankAllocator.budget_schedule``, to the bit
    (the same float64 arithmetic, on the host)."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if total is None:
        raise ValueError("AdaLoRA's budget schedule needs total_step (jpeft.train fills in the run's steps)")
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (mul_coeff**3) + target_budget), step % config.deltaT == 0


@functools.lru_cache(maxsize=8)
def _schedule_table(config: AdaloraConfig, init_budget: int, target_budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Budget and mask flag of steps ``0 … total_step − tfinal`` (the last one forced, as
    PEFT's final allocation), for the jitted :func:`after_step` to index."""
    end = config.total_step - config.tfinal
    rows = [budget_schedule(config, t, init_budget, target_budget) for t in range(end + 1)]
    budget = np.array([b for b, _ in rows], np.int32)
    mask = np.array([m for _, m in rows], bool)
    mask[end] = True
    return budget, mask


def frobenius(x: Array) -> Array:
    """``||x||_F`` over the last two axes, with the zero gradient of ``torch.norm`` at 0 (not NaN)."""
    sq = jnp.sum(x * x, axis=(-2, -1))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def orthogonality(trainable: PyTree) -> Array:
    """The mean over every ``Q`` and ``P`` of the model of ``||QQᵀ − I||_F`` and
    ``||PᵀP − I||_F`` (``aᵀa`` and ``b bᵀ`` here), as PEFT's ``AdaLoraModel.forward``; 0
    without AdaLoRA nodes."""
    norms = []
    for node in adalora_nodes(trainable):
        a, b = node.trainable["a"], node.trainable["b"]
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        gram_q = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=jax.lax.Precision.HIGHEST)
        gram_p = jnp.matmul(b, jnp.swapaxes(b, -1, -2), precision=jax.lax.Precision.HIGHEST)
        norms += [frobenius(gram_q - eye).ravel(), frobenius(gram_p - eye).ravel()]
    return jnp.mean(jnp.concatenate(norms)) if norms else jnp.zeros((), jnp.float32)


def regularizer(trainable: PyTree) -> Array:
    """``orth_reg_weight ·`` :func:`orthogonality`: what training adds to the loss."""
    nodes = adalora_nodes(trainable)
    if not nodes:
        return jnp.zeros((), jnp.float32)
    return shared_config(nodes).orth_reg_weight * orthogonality(trainable)


def update_importance(exp_avg_ipt: dict, exp_avg_unc: dict, params: dict, grads: dict, beta1: float,
                      beta2: float) -> tuple[dict, dict]:
    """One ``RankAllocator.update_ipt`` of one node's arrays: the smoothed sensitivity
    ``Ī`` and uncertainty ``Ū`` of ``I = |θ ⊙ ∇θ|`` (``Ū`` uses the updated ``Ī``)."""
    avg, unc = {}, {}
    for k in params:
        ipt = jnp.abs(params[k] * grads[k])
        avg[k] = beta1 * exp_avg_ipt[k] + (1 - beta1) * ipt
        unc[k] = beta2 * exp_avg_unc[k] + (1 - beta2) * jnp.abs(ipt - avg[k])
    return avg, unc


def triplet_scores(exp_avg_ipt: dict, exp_avg_unc: dict) -> Array:
    """Score of each rank of one node, shape of ``e``: ``s(e_i) + mean_j s(a_ji) + mean_j s(b_ij)``
    with ``s = Ī ⊙ Ū`` (PEFT's ``_element_score`` and ``_combine_ipt``, summed in its order)."""
    s = {k: exp_avg_ipt[k] * exp_avg_unc[k] for k in PARTS}
    return s["e"] + (jnp.mean(s["a"], axis=-2) + jnp.mean(s["b"], axis=-1))


def keep_masks(scores: list[Array], budget, init_budget: int) -> tuple[list[Array], Array]:
    """``(keep, threshold)``: the ranks whose score is above the ``(init_budget − budget)``-th
    smallest of all (``torch.kthvalue``); PEFT zeroes the others. Jit-able in ``budget``."""
    flat = jnp.concatenate([s.ravel() for s in scores])
    k = init_budget - jnp.asarray(budget, jnp.int32)
    kth = jnp.sort(flat)[jnp.clip(k - 1, 0, flat.size - 1)]
    threshold = jnp.where(k > 0, kth, -jnp.inf)
    return [s > threshold for s in scores], threshold


def init_state(trainable: PyTree) -> dict:
    """The importance state before step 1: ``Ī = Ū = 0`` for every entry of ``a``, ``e``,
    ``b``, every rank kept, the budget at its initial value."""
    nodes = adalora_nodes(trainable)
    zeros = lambda: [{k: jnp.zeros(n.trainable[k].shape, jnp.float32) for k in PARTS} for n in nodes]  # noqa: E731
    return {
        "exp_avg_ipt": zeros(),
        "exp_avg_unc": zeros(),
        "keep": [jnp.ones(n.trainable["e"].shape, bool) for n in nodes],
        "budget": jnp.asarray(budgets(nodes)[0] if nodes else 0, jnp.int32),
    }


def _replace_e(tree: PyTree, new_e: list[Array]) -> PyTree:
    it = iter(new_e)

    def swap(x):
        if is_node(x) and isinstance(x.config, AdaloraConfig):
            return x.replace(trainable={**x.trainable, "e": next(it)})
        return x

    return jax.tree_util.tree_map(swap, tree, is_leaf=is_node)


def after_step(state: dict, trainable: PyTree, grads: PyTree, step) -> tuple[PyTree, dict]:
    """PEFT's ``AdaLoraModel.update_and_allocate(step)``, called after optimizer step
    ``step`` with the updated trainables and the step's gradients; jit-able (``step`` may
    be traced). Returns the trainables with pruned ``e`` and the new state. ``step`` counts
    completed steps from 1, as the paper's Algorithm 1 (PEFT's example script passes a
    counter from 0, one step earlier), so ``tfinal=0`` ends on the final allocation.

    ``step < T − tfinal``: update the importance, and mask to the budget where the schedule
    says; ``step == T − tfinal``: the final allocation (mask to ``target_r`` per matrix from
    the importance so far, then reset it); ``step > T − tfinal``: re-apply that allocation
    (the optimizer revives pruned ``e`` entries, whose gradient is not zero).
    """
    nodes = adalora_nodes(trainable)
    if not nodes:
        return trainable, state
    config = shared_config(nodes)
    if config.total_step is None:
        raise ValueError("AdaLoRA's total_step is unknown: give it, or train with jpeft.train, which fills it in")
    init_budget, target_budget = budgets(nodes)
    end = config.total_step - config.tfinal
    table_budget, table_mask = _schedule_table(config, init_budget, target_budget)
    step = jnp.asarray(step, jnp.int32)
    row = jnp.clip(step, 0, end)
    budget = jnp.where(step > end, target_budget, jnp.asarray(table_budget)[row])
    masking = (step <= end) & jnp.asarray(table_mask)[row]

    params = [n.trainable for n in nodes]
    grad_parts = [n.trainable for n in adalora_nodes(grads)]
    updating = step < end
    avg, unc = [], []
    for old_avg, old_unc, p, g in zip(state["exp_avg_ipt"], state["exp_avg_unc"], params, grad_parts):
        new_avg, new_unc = update_importance(old_avg, old_unc, {k: p[k] for k in PARTS}, g, config.beta1, config.beta2)
        avg.append({k: jnp.where(updating, new_avg[k], old_avg[k]) for k in PARTS})
        unc.append({k: jnp.where(updating, new_unc[k], old_unc[k]) for k in PARTS})
    scores = [triplet_scores(a, u) for a, u in zip(avg, unc)]
    allocated, _ = keep_masks(scores, budget, init_budget)
    keep = [jnp.where(masking, new, old) for new, old in zip(allocated, state["keep"])]
    pruning = masking | (step > end)
    new_e = [jnp.where(pruning & ~k, jnp.zeros_like(p["e"]), p["e"]) for k, p in zip(keep, params)]
    final = step == end  # PEFT's reset_ipt after the final allocation
    reset = lambda trees: [{k: jnp.where(final, 0.0, t[k]).astype(t[k].dtype) for k in PARTS} for t in trees]  # noqa: E731
    new_state = {"exp_avg_ipt": reset(avg), "exp_avg_unc": reset(unc), "keep": keep, "budget": budget.astype(jnp.int32)}
    return _replace_e(trainable, new_e), new_state


def prepare(adapted: PyTree, total_steps: int) -> PyTree:
    """``adapted`` with ``total_step`` set to the run's ``total_steps`` in the AdaLoRA nodes
    that have none (ValueError if tinit + tfinal leaves no budgeting phase)."""

    def fill(x):
        if is_node(x) and isinstance(x.config, AdaloraConfig) and x.config.total_step is None:
            try:
                return x.replace(config=dataclasses.replace(x.config, total_step=int(total_steps)))
            except ValueError as e:
                raise ValueError(f"adalora with the run's {total_steps} steps: {e}") from None
        return x

    return jax.tree_util.tree_map(fill, adapted, is_leaf=is_node)


def metrics(state: dict, trainable: PyTree) -> dict[str, Array]:
    """What training logs: the step's ``budget`` and ``rank``, the non-zero ``e`` entries."""
    nodes = adalora_nodes(trainable)
    rank = sum((jnp.count_nonzero(n.trainable["e"]) for n in nodes), jnp.zeros((), jnp.int32))
    return {"budget": state["budget"], "rank": rank}


TRAINING = base.Training(prepare, init_state, regularizer, after_step, metrics)

METHOD = base.Method(AdaloraConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel,
                     training=TRAINING)
