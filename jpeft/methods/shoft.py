"""SHOFT: SVD Householder orthonormal fine-tuning (thesis ch. 6).

Thesis notation, ``M`` (out × in) with thin SVD ``M = U Σ Vᵀ`` (frozen ``U``, ``V``):

    M' = H_U · U · Σ' · Vᵀ · H_V                                         (thesis eq. 6.9)

``H_U = H(w_{U,0}) ⋯ H(w_{U,r_U-1})`` and ``H_V`` likewise are products of Householder
reflections ``H(w) = I - w wᵀ/τ``, ``τ = ||w||²/2``, evaluated with the CWY/UT transform
(:func:`jpeft.linalg.apply_householder`); ``Σ'`` is trainable, initialized to ``Σ``.
The Householder vectors start in equal consecutive pairs from U[-1, 1] (an odd count
ends with a zero vector), so ``H_U = H_V = I`` and ``M' = M`` at init (thesis §6.5).

On the Flax kernel ``K = Mᵀ = V Σ Uᵀ``: ``K' = H_Vᵀ V Σ' Uᵀ H_Uᵀ`` and

    y = ((((x H_Vᵀ) V) ⊙ σ') Uᵀ) H_Uᵀ.

The SVD is computed once, at ``apply``, in float64 on the host
(:func:`jpeft.linalg.svd_float64`). Frozen arrays: ``u`` (out × p), ``v`` (in × p),
``p = min(in, out)``, and ``sigma0`` (p), the base's singular values, in the kernel's
dtype; the original kernel is not kept. Trainable: ``w_u`` (out × r_U),
``w_v`` (in × r_V), ``sigma`` (p). ``u`` and ``v`` hold twice the numbers of a square
base, and the base rebuilds them (:func:`frozen_from_base`), so adapters store none of
the frozen arrays but ``sigma0``, which identifies the base they were trained on.

Paths: factored costs ``4·T·p·(in+out)`` plus ``O(T·(in·r_V + out·r_U))`` per training
step and no weight gradient; materializing costs ``6·T·in·out`` plus ``6·in·p·out`` to
rebuild and back-propagate ``(H_Vᵀ V) Σ' (Uᵀ H_Uᵀ)``. The cost model picks the cheaper:
factored for ``T`` large against ``p`` (the thesis' 4096-token steps on 2048² layers),
materialized for short inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class ShoftConfig:
    """r_u: Householder reflections on the output side (``H_U``); r_v: on the input side (``H_V``)."""

    r_u: int = 16
    r_v: int = 16

    def __post_init__(self):
        base.positive_int("r_u", self.r_u)
        base.positive_int("r_v", self.r_v)

    def check(self, shape):
        n, m = shape
        base.require(self.r_u <= m, f"r_u={self.r_u} exceeds the output dimension {m} of a {shape} kernel")
        base.require(self.r_v <= n, f"r_v={self.r_v} exceeds the input dimension {n} of a {shape} kernel")


def householder_init(key, shape, config) -> dict:
    """Paired Householder vectors for ``H_U`` and ``H_V`` (identity products)."""
    n, m = shape
    k_u, k_v = jax.random.split(key)
    return {
        "w_u": linalg.paired_householder_init(k_u, m, config.r_u),
        "w_v": linalg.paired_householder_init(k_v, n, config.r_v),
    }


def frozen_from_base(kernel, config: ShoftConfig) -> dict:
    """The frozen arrays of ``kernel``, in its dtype: ``u``, ``v`` of the float64 SVD
    ``K = V Σ Uᵀ`` (the left singular vectors of ``K`` are the thesis' ``V``) and
    ``sigma0 = Σ``. ``init`` builds them with the same code (:func:`_svd`), and
    ``jpeft.checkpoint.load_adapter`` calls it to rebuild an adapter's frozen arrays from
    its base instead of storing them.

    It is deterministic, so the same base gives the same arrays. Another LAPACK could flip
    the sign of a singular pair: column ``j`` of both ``u`` and ``v`` negated, which leaves
    ``K' = (H_Vᵀ V) Σ' (Uᵀ H_Uᵀ)`` unchanged because ``Σ'`` is diagonal (the two signs
    cancel in ``v_j σ'_j u_jᵀ``); only a repeated singular value, which trained weights do
    not have in practice, would leave a rotation of its pairs free. ``sigma0`` has no
    sign: it identifies the base, and an adapter loaded onto another base is refused by
    comparing it.
    """
    return _svd(kernel)[1]


def _svd(kernel) -> tuple[jax.Array, dict]:
    """``(Σ in float32, frozen arrays)``: ``init`` starts ``Σ'`` at the float32 ``Σ`` (not its
    rounding to a bf16 kernel's dtype), so it needs both."""
    v, s, u = linalg.svd_float64(kernel)
    return s, {"u": u.astype(kernel.dtype), "v": v.astype(kernel.dtype), "sigma0": s.astype(kernel.dtype)}


def init(key, kernel, config: ShoftConfig):
    s, frozen = _svd(kernel)
    return householder_init(key, kernel.shape, config) | {"sigma": s}, frozen


def materialize(node: Node) -> jax.Array:
    """``K' = (H_Vᵀ V) diag(σ') (Uᵀ H_Uᵀ)`` in float32."""
    t, f = node.trainable, node.frozen
    left = linalg.apply_householder(f["v"].astype(jnp.float32).T, t["w_v"]).T  # H_Vᵀ V
    right = linalg.apply_householder(f["u"].astype(jnp.float32).T, t["w_u"], transpose=True)  # Uᵀ H_Uᵀ
    return (left * t["sigma"]) @ right


def factored(x, node: Node, dropout_key=None):
    t, f = node.trainable, node.frozen
    h = linalg.apply_householder(x, t["w_v"], transpose=True) @ f["v"].astype(x.dtype)
    h = (h * t["sigma"].astype(x.dtype)) @ f["u"].T.astype(x.dtype)
    return linalg.apply_householder(h, t["w_u"], transpose=True)


def flops(node: Node, tokens: int):
    n, m = node.shape
    p = node.frozen["v"].shape[1]
    r_u, r_v = node.config.r_u, node.config.r_v
    reflect = 3 * 4.0 * tokens * (n * r_v + m * r_u)
    factored_cost = 4.0 * tokens * p * (n + m) + reflect
    rebuild = 3 * 2.0 * n * p * m + 3 * 4.0 * p * (n * r_v + m * r_u)
    return factored_cost, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(ShoftConfig, init, materialize, factored, flops, frozen_from_base=frozen_from_base)
