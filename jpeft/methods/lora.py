"""LoRA: low-rank adaptation (Hu et al., ICLR 2022; thesis §4.3), with the PiSSA, OLoRA
and rsLoRA variants of its start and scale.

Thesis notation, ``M`` (out × in): ``M' = M + (α/r) B A`` with ``A ∈ R^{r×n}`` random and
``B ∈ R^{m×r}`` zero, so ``M' = M`` at init. Here, on the Flax kernel ``K = Mᵀ`` (in, out):

    K' = K + s · a b,   a = Aᵀ (in × r),  b = Bᵀ (r × out),  s = α / r.

Orientation: ``a`` acts on inputs, ``b`` on outputs. HF PEFT mapping: ``lora_A.weight = aᵀ``,
``lora_B.weight = bᵀ``.

Init (``init=``, PEFT's ``init_lora_weights``):

* ``"gaussian"`` (the thesis' wording; PEFT's ``"gaussian"``): ``a ~ N(0, 1/r²)``, ``b = 0``.
* ``"kaiming"`` (PEFT's default ``True``): ``a ~ U(±1/sqrt(in))``, ``b = 0``.
* ``"pissa"`` (Meng, Wang & Zhang, NeurIPS 2024; PEFT's ``"pissa"``): the adapter starts
  at the principal part of the weight. With the SVD ``M = U S Vᵀ`` and ``S_r`` its top ``r``
  singular values divided by the scale (PEFT's ``pissa_init``): ``A = diag(√S_r) V_rᵀ``,
  ``B = U_r diag(√S_r)``, so ``s B A = U_r S V_rᵀ``, and the frozen weight is the residual
  ``M - s B A``. On the kernel ``K = Ũ S Ṽᵀ`` (``Ũ = V``, ``Ṽ = U``): ``a = Ũ_r diag(√S_r)``,
  ``b = diag(√S_r) Ṽ_rᵀ``.
* ``"olora"`` (Büyükakyüz, arXiv 2024; PEFT's ``"olora"``): the QR decomposition
  ``M = Q R`` gives ``B = Q_r`` (orthonormal columns) and ``A = R_r`` (its first ``r``
  rows), not divided by the scale, and the residual ``M - s B A`` is frozen; on the kernel
  ``a = R_rᵀ``, ``b = Q_rᵀ``.

PiSSA's SVD and OLoRA's QR run once per matrix at ``apply``, in float64 on the host (numpy/
scipy; PEFT uses float32), and only as far as the ``r`` factors need: PiSSA's top-``r``
singular triplets come from the Gram matrix's top eigenvectors (:func:`top_singular_triplets`,
a full SVD's triplets to ~1e-15 at a third of its time), OLoRA's ``Q_r``, ``R_r`` from the QR
of the first ``r`` columns (:func:`leading_qr`, LAPACK's Householder ``geqrf`` as torch, so
the same signs as PEFT's). PiSSA's singular pairs may differ from PEFT's in sign, which
leaves ``s B A`` and the residual unchanged. The residual is computed in float64 too, from
the float32 ``a``, ``b`` actually stored, then rounded to the kernel's dtype, so
``K' = residual + s a b`` equals ``K`` only up to that rounding and the float32 product
``a b`` (relative Frobenius error, pinned in ``tests/test_lora_inits.py`` with u the dtype's
unit roundoff: PiSSA ≤ 2u, measured 9e-8 in float32; OLoRA, whose residual is not divided
by the scale, ≤ u(1 + s), measured 4e-7 at s = 16; ``gaussian``/``kaiming`` are exact).

Memory: the residual (named ``residual``, in the kernel's dtype) replaces the base in the
node, which then no longer holds the model's kernel; while the caller keeps the original
parameter tree, each target costs one more full matrix. Adapters store ``a``, ``b`` and a
length-``r`` vector that identifies the base (:data:`BASE_CHECK`, as SHOFT's singular
values): :func:`frozen_from_base` rebuilds the residual from the base deterministically
(the same numpy code on the same kernel), and loading refuses a base whose vector differs,
such as a saved residual model instead of the original.

rsLoRA (Kalajdzievski, arXiv 2023; PEFT's ``use_rslora=True``): ``rslora=True`` scales by
``s = α / √r`` instead of ``α / r``; it applies to every init (PiSSA divides by it).

Paths: factored ``y = x K + s · (dropout(x) a) b`` costs ``4·T·n·m + 6·T·r·(n+m)`` FLOP per
training step and never forms a weight gradient; materializing ``K'`` costs
``6·T·n·m`` plus the rebuild ``6·n·r·m``, so the factored path wins for every ``r < min(n, m)``.
Dropout (on the adapter input only, as PEFT) exists only on the factored path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jpeft.methods import base
from jpeft.node import Node

#: Inits that keep the base kernel frozen (the adapter starts at zero).
BASE_INITS = ("gaussian", "kaiming")
#: Inits that move the weight's principal part into the adapter and freeze the residual.
RESIDUAL_INITS = ("pissa", "olora")
INITS = BASE_INITS + RESIDUAL_INITS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """r: rank; alpha: scale numerator (``s = alpha / r``, or ``alpha / sqrt(r)`` with
    ``rslora``); dropout: rate on the adapter input during training; init: ``"gaussian"``,
    ``"kaiming"``, ``"pissa"`` or ``"olora"`` (see the module docstring)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    init: str = "gaussian"
    rslora: bool = False

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_float("alpha", self.alpha)
        base.probability("dropout", self.dropout)
        # DoRA subclasses this config but normalizes K + s·ab, so it needs the base kernel
        inits = INITS if type(self) is LoraConfig else BASE_INITS
        base.require(self.init in inits, f"init must be one of {inits}, got {self.init!r}")
        base.require(isinstance(self.rslora, bool), f"rslora must be True or False, got {self.rslora!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def check(self, shape: tuple[int, int]) -> None:
        base.require(self.r <= min(shape), f"r={self.r} exceeds min(in, out) = {min(shape)} of a {shape} kernel")


def init_low_rank(key: jax.Array, shape: tuple[int, int], config: LoraConfig) -> dict:
    """``a`` random, ``b`` zero (the ``gaussian`` and ``kaiming`` inits)."""
    n, m = shape
    if config.init == "gaussian":
        a = jax.random.normal(key, (n, config.r), jnp.float32) / config.r
    else:
        a = base.kaiming_uniform(key, (n, config.r), fan_in=n)
    return {"a": a, "b": jnp.zeros((config.r, m), jnp.float32)}


def top_singular_triplets(k: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``r`` largest singular triplets of ``k`` (float64): ``u`` (rows × r), ``s`` (r),
    ``v`` (cols × r), ``k ≈ u diag(s) vᵀ``, largest first.

    The eigenvectors ``v`` of the smaller Gram matrix for just its top ``r`` eigenvalues
    (LAPACK ``syevr``), then the other side as ``k v / s`` with ``s = ||k v||``: a full
    SVD's triplets to ~1e-15 on a 2048² kernel, at a third of its time. Squaring the
    condition number costs accuracy only for singular values below ~1e-4 of the largest
    (a kernel of rank < r), and even then ``u diag(s) vᵀ = k v vᵀ`` with an orthonormal
    ``v``, so the residual ``k - u diag(s) vᵀ`` still adds back to ``k``. A zero singular
    value gets a zero vector (its factor columns are zero either way).
    """
    transpose = k.shape[1] > k.shape[0]
    k = k.T if transpose else k
    cols = k.shape[1]
    _, v = scipy.linalg.eigh(k.T @ k, subset_by_index=[cols - r, cols - 1])
    v = v[:, ::-1]  # ascending -> largest first
    w = k @ v
    s = np.linalg.norm(w, axis=0)
    u = w / np.where(s > 0, s, 1.0)
    return (v, s, u) if transpose else (u, s, v)


def leading_qr(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Q[:, :r], R[:r])`` of the Householder QR ``m = Q R`` (float64), from the QR of the
    first ``r`` columns alone: Householder reflections depend only on the columns they
    have reached, so LAPACK (``geqrf``, as torch) gives the same vectors and signs, and the
    rest of ``R``'s rows is ``Q_rᵀ m``; ``O(rows·cols·r)`` instead of a full QR."""
    q, head = np.linalg.qr(m[:, :r])
    return q, np.concatenate([head, q.T @ m[:, r:]], axis=1)


#: The vector each residual init keeps to identify its base (``jpeft.checkpoint`` stores it
#: and refuses an adapter whose base rebuilds another): PiSSA's top ``r`` singular values,
#: OLoRA's norms of the rows of ``R_r``. Both move by at most about ``||E||₂`` when the base
#: moves by ``E`` (Weyl's inequality; for OLoRA while the first ``r`` columns are far from
#: dependent), the bound the checkpoint's tolerance assumes.
BASE_CHECK = {"pissa": "sigma0", "olora": "r_norms"}


def residual_split(kernel: jax.Array, config: LoraConfig) -> tuple[dict, dict]:
    """``(trainable, frozen)`` of PiSSA or OLoRA for one (in, out) kernel: ``a``, ``b`` in
    float32; ``residual = K - s a b`` and the base check vector (:data:`BASE_CHECK`) in the
    kernel's dtype.

    Everything runs in float64 on the host (a ``pure_callback``: works under ``jit``, never
    runs under ``eval_shape``, no batched LAPACK). It is deterministic, so ``init`` and
    :func:`frozen_from_base` give the same arrays bit for bit.
    """
    n, m = kernel.shape
    r, s, method = config.r, config.scale, config.init
    out = (jax.ShapeDtypeStruct((n, r), jnp.float32), jax.ShapeDtypeStruct((r, m), jnp.float32),
           jax.ShapeDtypeStruct((n, m), jnp.float32), jax.ShapeDtypeStruct((r,), jnp.float32))

    def host(k):
        k = np.asarray(k, np.float64)
        if method == "pissa":
            u, check, v = top_singular_triplets(k, r)
            root = np.sqrt(check / s)
            a, b = u * root, root[:, None] * v.T
        else:  # olora: the first r columns of Q and rows of R of M = Kᵀ = Q R, as PEFT's full QR
            a, b = (x.T for x in leading_qr(k.T, r)[::-1])
            check = np.linalg.norm(a, axis=0)
        a, b = a.astype(np.float32), b.astype(np.float32)
        # the residual of the stored float32 factors, so residual + s a b rounds to K
        residual = k - s * (a.astype(np.float64) @ b.astype(np.float64))
        return a, b, residual.astype(np.float32), check.astype(np.float32)

    a, b, residual, check = jax.pure_callback(host, out, kernel, vmap_method="sequential")
    return {"a": a, "b": b}, {"residual": residual.astype(kernel.dtype), BASE_CHECK[method]: check.astype(kernel.dtype)}


def init(key: jax.Array, kernel: jax.Array, config: LoraConfig) -> tuple[dict, dict]:
    if config.init in RESIDUAL_INITS:
        return residual_split(kernel, config)
    return init_low_rank(key, kernel.shape, config), {"kernel": kernel}


def frozen_from_base(kernel: jax.Array, config: Any) -> dict:
    """The frozen dict ``init`` gives: the base kernel itself, or PiSSA's/OLoRA's residual
    and base check rebuilt from it. ``config=None`` stands for a config that keeps the base."""
    if getattr(config, "init", None) in RESIDUAL_INITS:
        return residual_split(kernel, config)[1]
    return {"kernel": kernel}


def frozen_weight(node: Node) -> jax.Array:
    """The frozen (in, out) matrix the adapter is added to: the base or the residual."""
    return node.frozen["residual"] if "residual" in node.frozen else node.frozen["kernel"]


def delta(node: Node) -> jax.Array:
    """``s · a b`` in float32."""
    return node.config.scale * (node.trainable["a"] @ node.trainable["b"])


def materialize(node: Node) -> jax.Array:
    return frozen_weight(node).astype(jnp.float32) + delta(node)


def low_rank_update(x: jax.Array, node: Node, dropout_key: jax.Array | None) -> jax.Array:
    """``s · (dropout(x) a) b`` in the compute dtype of ``x``."""
    a, b = (node.trainable[k].astype(x.dtype) for k in ("a", "b"))
    h = base.dropout(x, node.config.dropout, dropout_key) @ a
    return (h @ b) * jnp.asarray(node.config.scale, x.dtype)


def factored(x: jax.Array, node: Node, dropout_key: jax.Array | None = None) -> jax.Array:
    return x @ frozen_weight(node).astype(x.dtype) + low_rank_update(x, node, dropout_key)


def flops(node: Node, tokens: int) -> tuple[float, float]:
    return base.low_rank_flops(node, tokens, node.config.r)


METHOD = base.Method(LoraConfig, init, materialize, factored, flops, frozen_from_base=frozen_from_base)
