"""LoKr: low-rank Kronecker adaptation (Yeh et al., LyCORIS, ICLR 2024; thesis §4.4).

Thesis notation, ``M`` (out × in): ``M' = M + s · (C ⊗ D)`` with ``C ∈ R^{l×p}``,
``D ∈ R^{k×q}``, ``l·k = out``, ``p·q = in``; the rank of a Kronecker product is the
product of the ranks. Following HF PEFT/LyCORIS: ``(p, q) = factorization(in, factor)``,
``(l, k) = factorization(out, factor)``; ``C`` is a full (small) matrix initialized to
zero, and ``D`` is the low-rank product of two Kaiming-uniform factors when
``r < max(k, q) / 2``, a full Kaiming-uniform matrix otherwise; ``s = α / r``.

On the Flax kernel ``K`` (in, out): ``K' = K + s · (w1 ⊗ w2)`` with ``w1 = Cᵀ`` (p × l) and
``w2 = Dᵀ = w2_in @ w2_out`` (q × r) (r × k). HF PEFT mapping: ``lokr_w1 = w1ᵀ``,
``lokr_w2_a = w2_outᵀ``, ``lokr_w2_b = w2_inᵀ`` (or ``lokr_w2 = w2ᵀ``).

Paths: factored ``y = x K + s · x (w1 ⊗ w2)`` reshapes ``x`` to (…, p, q) and contracts
the two factors in turn, ``O(T·(in·k + p·out))`` instead of ``O(T·in·out)``: always the
cheaper one, so it is always chosen unless a caller asks otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class LokrConfig:
    """r: rank of the second factor; alpha: ``s = alpha / r``; factor: the
    factorization divider (-1: closest to the square root, as PEFT's default)."""

    r: int = 16
    alpha: float = 32.0
    factor: int = -1

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_float("alpha", self.alpha)
        base.require(
            isinstance(self.factor, int) and not isinstance(self.factor, bool) and (self.factor == -1 or self.factor > 0),
            f"factor must be -1 or a positive integer, got {self.factor!r}",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check(self, shape):
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")

    def factors(self, shape):
        """((p, q), (l, k), low_rank): the Kronecker split of (in, out) and whether ``w2`` is factored."""
        (p, q), (l, k) = (linalg.kron_factorization(d, self.factor) for d in shape)
        return (p, q), (l, k), self.r < max(k, q) / 2


def init(key, kernel, config: LokrConfig):
    (p, q), (l, k), low_rank = config.factors(kernel.shape)
    k_in, k_out = jax.random.split(key)
    trainable = {"w1": jnp.zeros((p, l), jnp.float32)}
    if low_rank:
        trainable["w2_in"] = base.kaiming_uniform(k_in, (q, config.r), fan_in=q)
        trainable["w2_out"] = base.kaiming_uniform(k_out, (config.r, k), fan_in=config.r)
    else:
        trainable["w2"] = base.kaiming_uniform(k_in, (q, k), fan_in=q)
    return trainable, {"kernel": kernel}


def second_factor(node: Node) -> jax.Array:
    t = node.trainable
    return t["w2"] if "w2" in t else t["w2_in"] @ t["w2_out"]


def materialize(node: Node) -> jax.Array:
    update = linalg.kron(node.trainable["w1"], second_factor(node))
    return node.frozen["kernel"].astype(jnp.float32) + node.config.scale * update


def factored(x, node: Node, dropout_key=None):
    update = linalg.apply_kron(x, node.trainable["w1"], second_factor(node))
    return x @ node.frozen["kernel"].astype(x.dtype) + update * jnp.asarray(node.config.scale, x.dtype)


def flops(node: Node, tokens: int):
    n, m = node.shape
    (p, q), (l, k), _ = node.config.factors(node.shape)
    adapter = 3 * 2.0 * tokens * (n * k + p * m)
    return base.frozen_step_flops(node, tokens) + adapter, base.dense_step_flops(node, tokens) + 3.0 * n * m


METHOD = base.Method(LokrConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
