"""LoRA-XS: low-rank adaptation with an extremely small number of parameters (Bałazy,
Banaei, Aberer & Tabor, arXiv 2405.17604, 2024; ECAI 2025).

The paper writes layers on row vectors, ``h = x W + x A R B``, so its ``W`` (in × out) is
the Flax kernel ``K`` itself. With the truncated SVD ``K ≈ U_r Σ_r V_rᵀ`` (top ``r`` pairs,
``U_r`` on the input side), ``A = U_r Σ_r`` and ``B = V_rᵀ`` are frozen and only the r × r
``R`` trains:

    K' = K + U_r Σ_r R V_rᵀ,    y = x K + (((x U_r) ⊙ σ) R) V_rᵀ.

Orientation: in this library's ``u`` (output side) / ``v`` (input side) names, the paper's
``U_r`` is ``v`` (in × r) and its ``V_r`` is ``u`` (out × r), so ``K' = K + v diag(σ) R uᵀ``
and, for the PyTorch weight ``W = Kᵀ``, ``W' = W + u Rᵀ diag(σ) vᵀ``. The official code
maps as ``lora_A.weight = (v diag(σ))ᵀ``, ``default_lora_latent_mapping.weight = Rᵀ``,
``lora_B.weight = u``; it also multiplies by PEFT's ``lora_alpha / r``, a constant factor
on ``R`` not modelled here. HF PEFT has no LoRA-XS (its TinyLoRA builds on it).

Init (the official code, ``init_module_weights(..., sigma=1e-5)``): ``R ~ N(0, σ_R²)``
with ``σ_R = 1e-5``, so the method starts near, not at, ``K``:
``||K' - K||_F = ||diag(σ) R||_F ≈ 1e-5 · sqrt(r · Σ_{i<r} σ_i²)``.

Frozen: the base ``kernel`` and ``u`` (out × r), ``v`` (in × r), ``sigma0`` (r) in the
kernel's dtype, from the float64 host SVD with fixed signs
(:func:`jpeft.methods.svft.frozen_svd`: an off-diagonal ``R_ij`` couples two pairs, so a
flipped pair would change ``K'``). The base rebuilds them (:func:`frozen_from_base`), so
adapters store ``R`` and ``sigma0`` (the base check). Trainable: ``R`` (r × r) float32.

Paths: factored ``x K + (((x v) ⊙ σ) R) uᵀ`` costs ``4·T·in·out + 4·T·r·(in+out) + 6·T·r²``
per training step, slightly less than LoRA's ``6·T·r·(in+out)`` adapter; materializing
costs ``6·T·in·out`` plus ``4·in·r·(r+out)`` to rebuild, so factored wins for every ``r``
below ``min(in, out)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.methods.svft import frozen_svd
from jpeft.node import Node

INIT_STD = 1e-5  # the official code's std of R


@dataclasses.dataclass(frozen=True)
class LoraxsConfig:
    """r: the number of top singular pairs kept and the side of the trainable ``R`` (r × r)."""

    r: int = 16

    def __post_init__(self):
        base.positive_int("r", self.r)

    def check(self, shape: tuple[int, int]) -> None:
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")


def frozen_from_base(kernel, config: LoraxsConfig) -> dict:
    """The base ``kernel`` and its top-``r`` ``u``, ``v``, ``sigma0`` (float64 SVD, fixed signs)."""
    return {"kernel": kernel, **frozen_svd(kernel, config.r)[1]}


def init(key, kernel, config: LoraxsConfig):
    r = INIT_STD * jax.random.normal(key, (config.r, config.r), jnp.float32)
    return {"R": r}, frozen_from_base(kernel, config)


def delta(node: Node) -> jax.Array:
    """``v diag(σ) R uᵀ`` in float32."""
    f = node.frozen
    left = (f["v"].astype(jnp.float32) * f["sigma0"].astype(jnp.float32)) @ node.trainable["R"]
    return left @ f["u"].astype(jnp.float32).T


def materialize(node: Node) -> jax.Array:
    return node.frozen["kernel"].astype(jnp.float32) + delta(node)


def factored(x, node: Node, dropout_key=None):
    f = node.frozen
    h = (x @ f["v"].astype(x.dtype)) * f["sigma0"].astype(x.dtype)
    h = h @ node.trainable["R"].astype(x.dtype)
    return x @ f["kernel"].astype(x.dtype) + h @ f["u"].T.astype(x.dtype)


def flops(node: Node, tokens: int):
    n, m = node.shape
    r = node.config.r
    adapter = 4.0 * tokens * r * (n + m) + 6.0 * tokens * r * r
    rebuild = 4.0 * n * r * (r + m)
    return base.frozen_step_flops(node, tokens) + adapter, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(LoraxsConfig, init, materialize, factored, flops, frozen_from_base=frozen_from_base)
