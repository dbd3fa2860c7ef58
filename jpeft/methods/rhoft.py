"""RHOFT: randomized SHOFT (thesis ch. 7).

SHOFT (:mod:`jpeft.methods.shoft`) on a rank-k randomized SVD ``M ≈ U_k Σ_k V_kᵀ``
(Halko, Martinsson & Tropp 2011; :func:`jpeft.linalg.randomized_svd`, with
``oversample`` extra samples and ``power_iters`` subspace iterations):

    M' = H_U · U_k · Σ'_k · V_kᵀ · H_V                                (thesis §7.4)

``M`` itself is dropped: only ``u`` (out × k), ``v`` (in × k) are kept frozen, so the
layer starts at the rank-k approximation of ``M``, not at ``M``. ``k = None`` takes the
thesis' memory-neutral ``k = in·out / (in + out)`` (1024 for 2048 × 2048), at which the
frozen factors hold as many numbers as ``M``. Everything else (paired Householder init,
orientation, both paths) is SHOFT's.

Paths: factored ``((x H_Vᵀ) V_k ⊙ σ') U_kᵀ H_Uᵀ`` costs one in × out matmul's worth at
``k = n/2`` (``2·T·k·(in+out)`` forward) and no weight gradient, so for the thesis
setting it is as cheap as the frozen base layer; the cost model falls back to
materializing only for very short inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.methods import base, shoft


@dataclasses.dataclass(frozen=True)
class RhoftConfig(shoft.ShoftConfig):
    """r_u, r_v: Householder reflections (as SHOFT); k: kept rank (None: ``in·out/(in+out)``);
    oversample, power_iters: randomized-SVD accuracy controls."""

    k: int | None = None
    oversample: int = 10
    power_iters: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.k is not None:
            base.positive_int("k", self.k)
        base.non_negative_int("oversample", self.oversample)
        base.non_negative_int("power_iters", self.power_iters)

    def rank(self, shape) -> int:
        n, m = shape
        return self.k if self.k is not None else max(1, n * m // (n + m))

    def check(self, shape):
        super().check(shape)
        base.require(
            self.rank(shape) <= min(shape),
            f"k={self.k} is out of range: it must be in [1, min(in, out) = {min(shape)}] for a {shape} kernel",
        )


def init(key, kernel, config: RhoftConfig):
    k_svd, k_house = jax.random.split(key)
    v, s, u = linalg.randomized_svd(
        k_svd, kernel, config.rank(kernel.shape), oversample=config.oversample, power_iters=config.power_iters
    )
    trainable = shoft.householder_init(k_house, kernel.shape, config) | {"sigma": s.astype(jnp.float32)}
    return trainable, {"u": u.astype(kernel.dtype), "v": v.astype(kernel.dtype)}


METHOD = base.Method(RhoftConfig, init, shoft.materialize, shoft.factored, shoft.flops)
