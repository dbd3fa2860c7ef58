"""HRA: Householder reflection adaptation (Yuan, Zhang, Li, Lin & Chen, NeurIPS 2024).

A chain of ``r`` trainable Householder reflections multiplies the frozen weight on its
input side. HF PEFT's layer computes ``W' = W H`` with ``H = H(u_0) ⋯ H(u_{r-1})`` and
``H(u) = I - 2 u uᵀ / ||u||²``, so on the Flax kernel ``K = Wᵀ`` (in, out):

    K' = Hᵀ K,    y = (x Hᵀ) K.

``u`` (in × r) is stored like PEFT's ``hra_u`` (values transfer as they are); its
columns start in equal consecutive pairs (PEFT's symmetric init, with PyTorch's
``kaiming_uniform_(a=sqrt(5))`` bound), so ``H = I`` and ``K' = K``. An odd ``r`` ends
with a zero column, which the CWY transform treats as the identity reflection (PEFT
falls back to a random, non-identity start there). SHOFT and RHOFT (thesis ch. 6–7)
are this chain on both sides of an SVD with a trainable spectrum.

Paths: factored applies the reflections to activations with the CWY/UT transform
(:func:`jpeft.linalg.apply_householder`, ``O(T·in·r)``) and the kernel gets no weight
gradient; materializing pays the dense ``6·T·in·out``. Factored wins for ``r ≪ out``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class HraConfig:
    """r: the number of Householder reflections (PEFT's ``r``; 16 by default, the rank the
    thesis gives every method, where PEFT's default is 8)."""

    r: int = 16

    def __post_init__(self):
        base.positive_int("r", self.r)

    def check(self, shape):
        base.require(self.r <= shape[0], f"r={self.r} exceeds the input dimension {shape[0]} of a {shape} kernel")


def init(key, kernel, config: HraConfig):
    # PEFT draws its half_u (in × r/2) with kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(r/2))
    bound = 1.0 / max(1, config.r // 2) ** 0.5
    return {"u": bound * linalg.paired_householder_init(key, kernel.shape[0], config.r)}, {"kernel": kernel}


def materialize(node: Node) -> jax.Array:
    """``K' = Hᵀ K = (Kᵀ H)ᵀ`` in float32, in O(in·out·r)."""
    kernel = node.frozen["kernel"].astype(jnp.float32)
    return linalg.apply_householder(kernel.T, node.trainable["u"]).T


def factored(x, node: Node, dropout_key=None):
    rotated = linalg.apply_householder(x, node.trainable["u"], transpose=True)
    return rotated @ node.frozen["kernel"].astype(x.dtype)


def flops(node: Node, tokens: int):
    n, m = node.shape
    r = node.config.r
    reflect = 3 * 4.0 * tokens * n * r  # x U and (·) Uᵀ, forward and twice backward
    build = 3 * 4.0 * n * m * r
    return base.frozen_step_flops(node, tokens) + reflect, base.dense_step_flops(node, tokens) + build


METHOD = base.Method(HraConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
