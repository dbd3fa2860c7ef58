"""LoRA: low-rank adaptation (Hu et al., ICLR 2022; thesis §4.3).

Thesis notation, ``M`` (out × in): ``M' = M + (α/r) B A`` with ``A ∈ R^{r×n}`` random and
``B ∈ R^{m×r}`` zero, so ``M' = M`` at init. Here, on the Flax kernel ``K = Mᵀ`` (in, out):

    K' = K + s · a b,   a = Aᵀ (in × r),  b = Bᵀ (r × out),  s = α / r.

HF PEFT mapping: ``lora_A.weight = aᵀ``, ``lora_B.weight = bᵀ``.

Init: ``init="gaussian"`` (the thesis' wording; PEFT's ``init_lora_weights="gaussian"``)
draws ``a ~ N(0, 1/r²)``; ``init="kaiming"`` is PEFT's default U(±1/sqrt(in)).

Paths: factored ``y = x K + s · (dropout(x) a) b`` costs ``4·T·n·m + 6·T·r·(n+m)`` FLOP per
training step and never forms a weight gradient; materializing ``K'`` costs
``6·T·n·m`` plus the rebuild, so the factored path wins for every ``r < min(n, m)``.
Dropout (on the adapter input only, as PEFT) exists only on the factored path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node

INITS = ("gaussian", "kaiming")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """r: rank; alpha: scale numerator (``s = alpha / r``); dropout: rate on the adapter
    input during training; init: ``"gaussian"`` or ``"kaiming"`` for ``a``."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    init: str = "gaussian"

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_float("alpha", self.alpha)
        base.probability("dropout", self.dropout)
        base.require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check(self, shape: tuple[int, int]) -> None:
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")


def init_low_rank(key, shape, config) -> dict:
    n, m = shape
    if config.init == "gaussian":
        a = jax.random.normal(key, (n, config.r), jnp.float32) / config.r
    else:
        a = base.kaiming_uniform(key, (n, config.r), fan_in=n)
    return {"a": a, "b": jnp.zeros((config.r, m), jnp.float32)}


def init(key, kernel, config: LoraConfig):
    return init_low_rank(key, kernel.shape, config), {"kernel": kernel}


def delta(node: Node) -> jax.Array:
    """``s · a b`` in float32."""
    return node.config.scale * (node.trainable["a"] @ node.trainable["b"])


def materialize(node: Node) -> jax.Array:
    return node.frozen["kernel"].astype(jnp.float32) + delta(node)


def low_rank_update(x, node: Node, dropout_key) -> jax.Array:
    """``s · (dropout(x) a) b`` in the compute dtype of ``x``."""
    a, b = (node.trainable[k].astype(x.dtype) for k in ("a", "b"))
    h = base.dropout(x, node.config.dropout, dropout_key) @ a
    return (h @ b) * jnp.asarray(node.config.scale, x.dtype)


def factored(x, node: Node, dropout_key=None):
    return x @ node.frozen["kernel"].astype(x.dtype) + low_rank_update(x, node, dropout_key)


def flops(node: Node, tokens: int):
    n, m = node.shape
    r = node.config.r
    adapter = 6.0 * tokens * r * (n + m)
    rebuild = 3 * 2.0 * n * r * m
    return base.frozen_step_flops(node, tokens) + adapter, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(LoraConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
