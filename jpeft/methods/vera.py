"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024).

Paper notation, ``W`` (out × in): ``h = W₀ x + Λ_b B Λ_d A x`` with ``A ∈ R^{r×in}`` and
``B ∈ R^{out×r}`` frozen random matrices drawn once and shared by every adapted layer,
and trainable scaling vectors ``d ∈ R^r`` (``Λ_d = diag(d)``) and ``b ∈ R^out``
(``Λ_b = diag(b)``). On the Flax kernel ``K = W₀ᵀ`` (in, out):

    K' = K + a diag(λ_d) p diag(λ_b),   a = Aᵀ (in × r),  p = Bᵀ (r × out).

Orientation: ``λ_d`` scales the ``r`` rank positions, ``λ_b`` the outputs (the columns of ``K``).

HF PEFT mapping (``VeraConfig``, peft/tuners/vera): ``vera_lambda_d = λ_d``,
``vera_lambda_b = λ_b``, ``vera_A[:, :in] = aᵀ`` and ``vera_B[:out, :] = pᵀ`` (frozen
``a``, ``b`` here hold ``a`` and ``p``).

Init (as PEFT): one draw per ``jpeft.apply`` (:func:`shared`, from the apply key) of
``A`` (r × max in) and ``B`` (max out × r) over the targets, each with PyTorch's
``kaiming_uniform_`` of gain √2 as PEFT's ``_kaiming_init``, ``U(±√(6 / fan_in))``
(``fan_in`` = max in for ``A``, ``r`` for ``B``); a target takes their first ``in``
columns and ``out`` rows. Targets with the same ``in`` (``out``) and dtype hold the very
same array object, so the projections cost one copy per distinct size, not per target.
``λ_d = d_init`` and ``λ_b = 0``, so ``K' = K``. The projections depend on the key, not
the base: adapter exports store each target's ``a`` and ``b`` (no ``frozen_from_base``),
and a loaded tree holds one copy per target.

Paths: factored ``y = x K + ((dropout(x) a) λ_d) p λ_b`` never forms a weight gradient
(``a``, ``p`` are frozen: only the activations' gradient flows through them):
``4·T·n·m + 4·T·r·(n+m)`` plus ``T·(5m + 4r)`` elementwise FLOP per training step.
Materializing costs ``6·T·n·m`` plus the rebuild ``6·n·r·m`` (``a λ_d p λ_b`` and the
gradients of both vectors through it). Factored wins while ``r`` is below about
``n·m / (2(n+m))`` (512 for a 2048 × 2048 kernel; default ``r = 256``). Dropout (on the
adapter input, as PEFT's ``vera_dropout``) exists only on the factored path.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class VeraConfig:
    """r: the rank of the shared random projections (PEFT's default 256); d_init: the
    initial value of every entry of ``λ_d`` (PEFT's ``d_initial``); dropout: rate on the
    adapter input during training (PEFT's ``vera_dropout``)."""

    r: int = 256
    d_init: float = 0.1
    dropout: float = 0.0

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.positive_float("d_init", self.d_init)
        base.probability("dropout", self.dropout)

    def check(self, shape: tuple[int, int]) -> None:
        # no bound on r: the random projections have any rank (the update's rank is at most min(shape))
        pass


def _uniform(key, shape, fan_in: int) -> jax.Array:
    """PEFT's ``_kaiming_init`` (``kaiming_uniform_`` with gain √2): U(±√(6 / fan_in))."""
    bound = (6.0 / fan_in) ** 0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def shared(key: jax.Array, layers: list, config: VeraConfig) -> dict:
    """The projections every target shares: ``{"a": {(in, dtype): a}, "b": {(out, dtype): p}}``.

    One draw of ``a`` (max in × r) and ``p`` (r × max out) in float32; each distinct
    ``in`` (``out``) and dtype gets one slice, cast once, which every target of that size
    receives as the same object."""
    n_max = max(int(layer.shape[0]) for layer in layers)
    m_max = max(int(layer.shape[1]) for layer in layers)
    key_a, key_b = jax.random.split(key)
    a_full = _uniform(key_a, (n_max, config.r), fan_in=n_max)  # PEFT's vera_A (r, max in), transposed
    b_full = _uniform(key_b, (config.r, m_max), fan_in=config.r)  # PEFT's vera_B (max out, r), transposed
    a, b = {}, {}
    for layer in layers:
        (n, m), dtype = layer.shape, np.dtype(layer.dtype)
        if (n, dtype) not in a:
            a[(n, dtype)] = a_full[:n].astype(dtype)
        if (m, dtype) not in b:
            b[(m, dtype)] = b_full[:, :m].astype(dtype)
    return {"a": a, "b": b}


def init(key: jax.Array | None, kernel: jax.Array, config: VeraConfig, shared: dict) -> tuple[dict, dict]:
    n, m = kernel.shape
    dtype = np.dtype(kernel.dtype)
    if (n, dtype) not in shared["a"] or (m, dtype) not in shared["b"]:
        raise ValueError(f"vera: the shared projections were drawn for other layers than this {(n, m)} {dtype.name} kernel")
    trainable = {"lambda_d": jnp.full((config.r,), config.d_init, jnp.float32), "lambda_b": jnp.zeros((m,), jnp.float32)}
    return trainable, {"kernel": kernel, "a": shared["a"][(n, dtype)], "b": shared["b"][(m, dtype)]}


def delta(node: Node) -> jax.Array:
    """``a diag(λ_d) p diag(λ_b)`` in float32."""
    t, f = node.trainable, node.frozen
    return (f["a"].astype(jnp.float32) * t["lambda_d"]) @ (f["b"].astype(jnp.float32) * t["lambda_b"])


def materialize(node: Node) -> jax.Array:
    return node.frozen["kernel"].astype(jnp.float32) + delta(node)


def factored(x: jax.Array, node: Node, dropout_key: jax.Array | None = None) -> jax.Array:
    t, f = node.trainable, node.frozen
    h = base.dropout(x, node.config.dropout, dropout_key) @ f["a"].astype(x.dtype)
    h = (h * t["lambda_d"].astype(x.dtype)) @ f["b"].astype(x.dtype)
    return x @ f["kernel"].astype(x.dtype) + h * t["lambda_b"].astype(x.dtype)


def flops(node: Node, tokens: int) -> tuple[float, float]:
    n, m = node.shape
    r = node.config.r
    # x a and (·) p forward, and backward to the activations only (a, p are frozen)
    adapter = 4.0 * tokens * r * (n + m) + tokens * (5.0 * m + 4.0 * r)
    rebuild = 3 * 2.0 * n * r * m
    return base.frozen_step_flops(node, tokens) + adapter, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(VeraConfig, init, materialize, factored, flops, shared=shared)
