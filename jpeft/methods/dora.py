"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024; thesis §4.5).

Thesis notation, ``M`` (out × in): ``M' = m ⊙ (M + s B A) / ||M + s B A||`` with the norm
taken per output row and the magnitude ``m ∈ R^{out}`` initialized to ``||M||``, so
``M' = M`` at init. On the Flax kernel ``K`` (in, out) the norm is per column:

    V = K + s · a b,   K' = V · diag(m / ||V||_col).

As in the DoRA paper (§4.3) and HF PEFT, ``||V||`` is treated as a constant in the
backward pass (``stop_gradient``), which saves the memory of its gradient.
HF PEFT mapping: LoRA's, plus ``lora_magnitude_vector = m``.

Paths: factored ``y = g ⊙ (x K + s (dropout(x) a) b)``, ``g = m / ||V||``, where
``||V||² = ||K||² + 2s·colsum((aᵀK) ⊙ b) + s²·colsum(b ⊙ (aᵀa) b)`` costs O(r·n·m) without
forming ``V``; materializing pays the dense weight gradient, so the
factored path is chosen whenever ``T > r``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base, lora
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class DoraConfig(lora.LoraConfig):
    """Same hyper-parameters as LoRA: r, alpha, dropout, init."""


def init(key, kernel, config: DoraConfig):
    trainable = lora.init_low_rank(key, kernel.shape, config)
    trainable["magnitude"] = jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)
    return trainable, {"kernel": kernel}


def materialize(node: Node) -> jax.Array:
    v = lora.materialize(node)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))
    return v * (node.trainable["magnitude"] / norm)


def column_norm(node: Node) -> jax.Array:
    """``||K + s a b||`` per output column, in float32, without forming the sum."""
    kernel = node.frozen["kernel"].astype(jnp.float32)
    a, b = node.trainable["a"], node.trainable["b"]
    s = node.config.scale
    sq = (
        jnp.sum(kernel * kernel, axis=0)
        + 2 * s * jnp.sum((a.T @ kernel) * b, axis=0)
        + s * s * jnp.sum(b * ((a.T @ a) @ b), axis=0)
    )
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def factored(x, node: Node, dropout_key=None):
    gain = node.trainable["magnitude"] / jax.lax.stop_gradient(column_norm(node))
    return lora.factored(x, node, dropout_key) * gain.astype(x.dtype)


def flops(node: Node, tokens: int):
    n, m = node.shape
    r = node.config.r
    norms = 3 * 2.0 * n * m * (r + 1)
    fact, mat = lora.flops(node, tokens)
    return fact + norms + 4.0 * tokens * m, mat + 3 * 2.0 * n * m


METHOD = base.Method(DoraConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
