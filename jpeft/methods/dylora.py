"""DyLoRA: LoRA trained for every rank up to ``r`` at once (Valipour, Rezagholizadeh,
Kobyzev & Ghodsi, EACL 2023).

Paper notation, ``W`` (out × in): each training step draws a rank ``b ~ U{1, …, r}`` and
runs the truncated LoRA block

    h = W₀ x + (α / b) W_up↓b W_dw↓b x,   W_dw↓b = W_dw[:b, :],  W_up↓b = W_up[:, :b],

with ``W_dw ∈ R^{r×in}``, ``W_up ∈ R^{out×r}``; the scale follows the rank (``α / b``,
as the paper and the official code, whose ``sqrt(r / b)`` on each factor times ``α / r``
is ``α / b``). On the Flax kernel ``K = W₀ᵀ`` (in, out), with ``a = W_dwᵀ`` (in × r) and
``c = W_upᵀ`` (stored as ``b``, r × out):

    K'_b = K + (α / b) a[:, :b] c[:b, :].

Orientation: rank positions are the columns of ``a`` and the rows of ``b``, the first
``b`` kept. Evaluated at rank ``e``, a node is exactly PEFT's ``LoraConfig(r=e,
lora_alpha=α)`` with ``lora_A = a[:, :e]ᵀ``, ``lora_B = b[:e]ᵀ`` (PEFT has no DyLoRA).

Update (``update="last"``, the default): only the ``b``-th rank position of the step
learns, the lower ones enter the step frozen (the paper's update of ``W_dw^b``,
``W_up^b``; the official script's ``set_rank(b, frozen=True)``); ``update="all"`` trains
every position up to ``b`` (the paper's non-frozen ablation). The input's gradient flows
through every kept position either way.

Training: the rank comes from the training key (the ``dropout_key`` ``factored``
receives): each node and step draws its own ``b`` (:func:`sample_rank`), where the
official script draws one ``b`` per step for the whole model. Rank positions above ``b``
are masked, so one compiled step serves every ``b``. ``Method.uses_key`` makes models
pass the key even without dropout, and ``jpeft.linear`` then takes the factored path.
Evaluation (no key) runs the rank ``eval_rank`` (default ``r``);
``jpeft.materialize(tree, rank=e)`` or ``jpeft.core.with_rank(tree, e)`` set it.

Init (the official code's LoRA init): ``a ~ U(±1/√in)`` (PyTorch's
``kaiming_uniform_(a=√5)``), ``b = 0``, so ``K' = K`` at every rank.

Paths: as LoRA at the evaluated rank ``e``: factored ``4·T·n·m + 6·T·e·(n+m)`` FLOP per
training step, never forming a weight gradient; materialized ``6·T·n·m + 6·n·e·m``.
Factored wins for every ``e < min(n, m)``. A keyed (training) step runs the full ``r``
masked (``e = r`` unless another rank was set), always factored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node

UPDATES = ("last", "all")


@dataclasses.dataclass(frozen=True)
class DyloraConfig:
    """r: the largest rank (every rank 1..r is trained); alpha: scale numerator (rank
    ``b`` runs with ``alpha / b``); eval_rank: the rank evaluation runs (``None``: ``r``);
    update: ``"last"`` trains only the drawn rank's position each step (the paper),
    ``"all"`` every position up to it."""

    r: int = 16
    alpha: float = 32.0
    eval_rank: int | None = None
    update: str = "last"

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_float("alpha", self.alpha)
        if self.eval_rank is not None:
            base.positive_int("eval_rank", self.eval_rank)
            base.require(self.eval_rank <= self.r, f"eval_rank={self.eval_rank} exceeds r={self.r}, the largest rank trained")
        base.require(self.update in UPDATES, f"update must be one of {UPDATES}, got {self.update!r}")

    @property
    def rank(self) -> int:
        """The rank evaluation (no key) and ``materialize`` use."""
        return self.r if self.eval_rank is None else self.eval_rank

    def check(self, shape: tuple[int, int]) -> None:
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")


def with_rank(config: DyloraConfig, rank: int) -> DyloraConfig:
    """``config`` evaluating at ``rank`` (1 ≤ rank ≤ r)."""
    base.positive_int("rank", rank)
    base.require(rank <= config.r, f"rank={rank} exceeds r={config.r}, the largest rank this node was trained for")
    return dataclasses.replace(config, eval_rank=rank)


def init(key: jax.Array, kernel: jax.Array, config: DyloraConfig) -> tuple[dict, dict]:
    n, m = kernel.shape
    a = base.kaiming_uniform(key, (n, config.r), fan_in=n)
    return {"a": a, "b": jnp.zeros((config.r, m), jnp.float32)}, {"kernel": kernel}


def sample_rank(key: jax.Array, config: DyloraConfig) -> jax.Array:
    """The training rank ``b ~ U{1, …, r}`` a node draws from its training key (int32)."""
    return jax.random.randint(key, (), 1, config.r + 1)


def truncated(trainable: dict, rank: jax.Array, config: DyloraConfig) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` of a training step at the traced ``rank``: columns of ``a`` past ``rank``
    zeroed (so the rows of ``b`` past it receive nothing either), and with
    ``update="last"`` the positions below ``rank`` cut from the gradient."""
    a, b = trainable["a"], trainable["b"]
    position = jnp.arange(config.r)
    if config.update == "last":
        last = position == rank - 1
        a = jnp.where(last, a, jax.lax.stop_gradient(a))
        b = jnp.where(last[:, None], b, jax.lax.stop_gradient(b))
    return jnp.where(position < rank, a, 0), b


def materialize(node: Node) -> jax.Array:
    """``K + (α / e) a[:, :e] b[:e]`` at the evaluation rank ``e``, in float32."""
    e = node.config.rank
    t = node.trainable
    return node.frozen["kernel"].astype(jnp.float32) + (node.config.alpha / e) * (t["a"][:, :e] @ t["b"][:e])


def factored(x: jax.Array, node: Node, dropout_key: jax.Array | None = None) -> jax.Array:
    config = node.config
    y = x @ node.frozen["kernel"].astype(x.dtype)
    if dropout_key is None:  # evaluation: a static slice at the evaluation rank
        e = config.rank
        a, b = node.trainable["a"][:, :e], node.trainable["b"][:e]
        scale = jnp.asarray(config.alpha / e, x.dtype)
    else:
        rank = sample_rank(dropout_key, config)
        a, b = truncated(node.trainable, rank, config)
        scale = (config.alpha / rank).astype(x.dtype)
    return y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * scale


def flops(node: Node, tokens: int) -> tuple[float, float]:
    return base.low_rank_flops(node, tokens, node.config.rank)


def uses_key(config: DyloraConfig) -> bool:
    """Every training step draws a rank: a node always takes the training key."""
    return True


METHOD = base.Method(DyloraConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel,
                     uses_key=uses_key, with_rank=with_rank)
