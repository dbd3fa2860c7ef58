"""HOFT: Householder orthogonal fine-tuning (Moreno Arcas, Sanchis, Civera & Juan, "HOFT:
Householder Orthogonal Fine-tuning", arXiv 2505.16531, 2025; the thesis' published follow-up).

Paper notation, ``M`` (m × n = out × in): two orthogonal factors, one on each side,

    HOFT:   M' = Q_U M Q_V                 (§3.3)
    SHOFT:  M' = Q_U diag(μ) M Q_V         (§3.4, ``scaled=True``; the paper's "m", here ``μ``)

``Q_U = H(u_1) ⋯ H(u_{r_u}) ∈ O(out)`` and ``Q_V = H(v_1) ⋯ H(v_{r_v}) ∈ O(in)`` are products
of Householder reflections ``H(u) = I - u uᵀ/τ``, ``τ = ||u||²/2``, accumulated by the CWY
transform ``Q = I - U S^{-1} Uᵀ`` (``S`` the upper triangle of ``UᵀU``, diagonal halved;
:func:`jpeft.linalg.apply_householder`). The paper approximates ``S^{-1}`` by the first two
terms of a Neumann series; this module solves the triangular system exactly, so ``Q_U``,
``Q_V`` are orthogonal to rounding for every trained value. SHOFT's trainable scaling
vector ``μ ∈ R^out`` sits between ``M`` and ``Q_U`` ("redirect with Q_V, transform with M,
then scale with m and finally redirect with Q_U"), starting at ones; it adds ``out``
trainables per layer. The scaled variant of the paper is named SHOFT there; it is not the
thesis' SVD-based SHOFT (:mod:`jpeft.methods.shoft`).

On the Flax kernel ``K = Mᵀ`` (in, out), one line: ``K' = Q_Vᵀ K diag(μ) Q_Uᵀ``, so

    y = (((x Q_Vᵀ) K) ⊙ μ) Q_Uᵀ,

the input-side factor acting on activations before the frozen product and the output-side
one after it. HF PEFT has no HOFT (its OFT borrows only the Neumann-series Cayley solve).

Init (§3.3): the Householder vectors come in equal consecutive pairs drawn from a standard
Gaussian (an odd count ends with a zero vector, the identity reflection of the CWY form),
so ``Q_U = Q_V = I``, ``μ = 1`` and ``K' = K`` exactly. Trainable: ``w_u`` (out × r_u),
``w_v`` (in × r_v), and ``magnitude`` (out,) when scaled; frozen: the base kernel only.

Paths: factored costs ``4·T·in·out + 12·T·(in·r_v + out·r_u)`` per training step (the two
reflections on activations, forward and twice backward) and no weight gradient;
materializing costs the dense ``6·T·in·out`` plus ``12·in·out·(r_u + r_v)`` to build and
back-propagate ``K'``. Factored wins at every ``T`` once ``6·(in·r_v + out·r_u) < in·out``
(``r_u + r_v < 342`` on a 2048² layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class HoftConfig:
    """r_u: Householder reflections of the output side (``Q_U``); r_v: of the input side
    (``Q_V``); scaled: SHOFT's trainable scaling vector between ``M`` and ``Q_U``."""

    r_u: int = 16
    r_v: int = 16
    scaled: bool = False

    def __post_init__(self):
        base.positive_int("r_u", self.r_u)
        base.positive_int("r_v", self.r_v)
        base.require(isinstance(self.scaled, bool), f"scaled must be True or False, got {self.scaled!r}")

    def check(self, shape: tuple[int, int]) -> None:
        n, m = shape
        base.require(self.r_u <= m, f"r_u={self.r_u} exceeds the output dimension {m} of a {shape} kernel")
        base.require(self.r_v <= n, f"r_v={self.r_v} exceeds the input dimension {n} of a {shape} kernel")


def paired_gaussian(key: jax.Array, dim: int, count: int) -> jax.Array:
    """``count`` Householder vectors (dim × count) in equal consecutive pairs from N(0, 1), a
    zero vector last for an odd count: their product is exactly the identity."""
    half = jax.random.normal(key, (dim, count // 2), jnp.float32)
    u = jnp.repeat(half, 2, axis=1)
    return jnp.concatenate([u, jnp.zeros((dim, count % 2), jnp.float32)], axis=1)


def init(key, kernel, config: HoftConfig):
    n, m = kernel.shape
    k_u, k_v = jax.random.split(key)
    trainable = {"w_u": paired_gaussian(k_u, m, config.r_u), "w_v": paired_gaussian(k_v, n, config.r_v)}
    if config.scaled:
        trainable["magnitude"] = jnp.ones((m,), jnp.float32)
    return trainable, {"kernel": kernel}


def materialize(node: Node) -> jax.Array:
    """``K' = (Q_Vᵀ K) diag(μ) Q_Uᵀ`` in float32, in ``O(in·out·(r_u + r_v))``."""
    t = node.trainable
    left = linalg.apply_householder(node.frozen["kernel"].astype(jnp.float32).T, t["w_v"]).T  # (Kᵀ Q_V)ᵀ = Q_Vᵀ K
    if "magnitude" in t:
        left = left * t["magnitude"]
    return linalg.apply_householder(left, t["w_u"], transpose=True)


def factored(x, node: Node, dropout_key=None):
    t = node.trainable
    h = linalg.apply_householder(x, t["w_v"], transpose=True) @ node.frozen["kernel"].astype(x.dtype)
    if "magnitude" in t:
        h = h * t["magnitude"].astype(x.dtype)
    return linalg.apply_householder(h, t["w_u"], transpose=True)


def flops(node: Node, tokens: int):
    n, m = node.shape
    r_u, r_v = node.config.r_u, node.config.r_v
    scale = 3.0 if node.config.scaled else 0.0  # μ's product: forward, and its two gradients
    # per side (d, k): x U and (·) Uᵀ forward and twice backward, the k × k solves, x - (·)
    reflect = sum(12.0 * d * k + 6.0 * k * k + 3.0 * d for d, k in ((n, r_v), (m, r_u)))
    factored_cost = base.frozen_step_flops(node, tokens) + tokens * (reflect + scale * m)
    rebuild = 12.0 * n * m * (r_u + r_v) + scale * n * m
    return factored_cost, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(HoftConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
