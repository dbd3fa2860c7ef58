"""MoRA: high-rank updating (Jiang, Huang, Luo, Zhang, Huang, Wei, Deng, Sun, Zhang, Wang &
Zhuang, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", arXiv 2405.12130, 2024).

Paper notation, ``W₀`` (d × k = out × in): one trainable square ``M ∈ R^{r̂×r̂}`` between two
parameter-free maps,

    h = W₀ x + f_decomp(M f_comp(x)),    r̂ = ⌊√((d + k) r)⌋,

so ``M`` has LoRA's parameter budget ``(d + k) r`` (at most) but ``ΔW`` can reach rank
``r̂`` instead of ``r``. ``M = 0`` at init, so ``W' = W₀`` exactly. The authors' code
(github kongds/MoRA, ``_apply_mora``) defines the operators; both variants of it are here:

* ``compress="sum"`` (their ``mora_type=1``, the paper's sharing, eq. 6): ``x`` is padded to
  ``g = ⌈in / r̂⌉`` groups of ``r̂`` by repeating its first ``pad = g r̂ - in`` features,
  ``f_comp`` sums the groups, and ``f_decomp`` repeats ``M``'s output and truncates it to
  ``out`` (output ``j`` reads entry ``j mod r̂``).
* ``compress="rotate"`` (their ``mora_type=6``, the paper's eq. 9, which it recommends for
  small ranks such as the default ``r = 16``): the padded ``x`` is cut into ``g`` blocks
  ``x_b`` of ``r̂``, block ``b`` is rotated RoPE-style by position ``b``,
  ``x_b ↦ x_b ⊙ cos_b + rotate_half(x_b) ⊙ sin_b`` (frequencies ``10000^{-2j/r̂}``), and
  ``M`` maps every block; the ``g r̂`` outputs are concatenated, then truncated to ``out``
  or repeated (output ``j`` reads entry ``j mod g r̂``). An odd ``r̂``, which the authors'
  code cannot handle, leaves its last coordinate unrotated.

On the Flax kernel ``K = W₀ᵀ`` (in, out) the update acts on rows: ``y = x K + Δ(x)``; the
trainable ``m`` (r̂ × r̂) is ``Mᵀ``, so ``m = lora_A.weight.T`` of the authors' PEFT fork
(``use_mora=True``; HF PEFT has no MoRA). Their fork rounds ``r̂`` to the nearest integer
where the paper floors; this module follows the paper (the two agree at Phi-1.5's
2048 × 2048, ``r̂ = 256``). Scale 1 (no ``alpha``), as their code; ``dropout`` acts on the
adapter input (factored path only). ``r̂ > min(in, out)`` is refused: the compression
would repeat inputs and the decompression drop outputs, wasting trainable entries.

Paths: factored costs ``4·T·in·out`` for the frozen product plus ``6·T·r̂²`` ("sum") or
``6·T·n_b·r̂²`` ("rotate", one product per block that reaches the output,
``n_b = min(g, ⌈out / r̂⌉)``), and some ``O(T·(in + out))`` additions; materializing costs
the dense ``6·T·in·out`` plus an ``O(in·out)`` gather (``ΔK`` is ``M``'s entries placed by
the two maps, a block-diagonal of ``R_b m`` for "rotate"), not the ``O(in·(in + pad)·r̂)``
of pushing the identity through the update. The factored path wins whenever
``3·n_b·r̂² < in·out`` (at Phi size, 2048², "rotate": ``n_b r̂ = 2048``, 8 blocks).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods import base
from jpeft.node import Node

COMPRESSIONS = ("rotate", "sum")


@dataclasses.dataclass(frozen=True)
class MoraConfig:
    """r: the LoRA rank whose budget ``M`` gets (``r̂ = ⌊√((in + out)·r)⌋``); compress:
    ``"rotate"`` (RoPE-style blocks, the paper's choice for small ranks) or ``"sum"``
    (shared rows and columns, its choice for large ranks); dropout: rate on the adapter input."""

    r: int = 16
    compress: str = "rotate"
    dropout: float = 0.0

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.require(self.compress in COMPRESSIONS, f"compress must be one of {COMPRESSIONS}, got {self.compress!r}")
        base.probability("dropout", self.dropout)

    def rank(self, shape: tuple[int, int]) -> int:
        """``r̂ = ⌊√((in + out)·r)⌋``, the side of ``M`` for an (in, out) kernel."""
        return math.isqrt((shape[0] + shape[1]) * self.r)

    def check(self, shape: tuple[int, int]) -> None:
        n, m = shape
        r_hat, p = self.rank(shape), min(shape)
        if r_hat <= p:
            return
        largest = ((p + 1) ** 2 - 1) // (n + m)  # the largest r with ⌊√((n + m) r)⌋ <= p
        fits = f"use r <= {largest}" if largest else "no r fits this shape"
        base.require(False, f"r={self.r} gives r̂ = ⌊√((in + out)·r)⌋ = {r_hat}, more than min(in, out) = {p} "
                            f"of a {shape} kernel; MoRA's square matrix must fit between its compression and "
                            f"decompression ({fits})")


def geometry(shape: tuple[int, int], config: MoraConfig) -> tuple[int, int, int]:
    """``(r̂, g, pad)``: the side of ``M``, the number of groups/blocks of the padded input
    and the number of its first features repeated to fill the last one."""
    r_hat = config.rank(shape)
    groups = -(-shape[0] // r_hat)
    return r_hat, groups, groups * r_hat - shape[0]


def rotation_tables(r_hat: int, blocks: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(cos, signed_sin, half)`` (blocks × r̂, float64) of the RoPE-style rotation: block
    ``b`` maps ``v ↦ v ⊙ cos_b + rotate_half(v) ⊙ sin_b`` with
    ``rotate_half(v) = (v[h:2h], v[:h], v[2h:])`` and the sign folded into ``signed_sin``
    (``-`` on the first half), ``h = ⌊r̂/2⌋``. The angle of coordinates ``j`` and ``j + h`` is
    ``b · 10000^{-2j/r̂}`` (the authors' ``inv_freq``); an odd last coordinate keeps angle 0."""
    half = r_hat // 2
    freqs = np.outer(np.arange(blocks), 1.0 / 10000 ** (2 * np.arange(half) / r_hat))
    angle = np.concatenate([freqs, freqs, np.zeros((blocks, r_hat - 2 * half))], axis=1)
    sign = np.concatenate([-np.ones(half), np.ones(r_hat - half)])
    return np.cos(angle), np.sin(angle) * sign, half


def _rotate_half(v: jax.Array, half: int) -> jax.Array:
    """``(v[h:2h], v[:h], v[2h:])`` along the last axis (slices, not a gather)."""
    return jnp.concatenate([v[..., half:2 * half], v[..., :half], v[..., 2 * half:]], axis=-1)


def _decompress(o: jax.Array, out: int) -> jax.Array:
    """Output ``j`` reads ``o[..., j mod width]``: truncate, or repeat and truncate."""
    repeats = -(-out // o.shape[-1])
    if repeats > 1:
        o = jnp.concatenate([o] * repeats, axis=-1)
    return o[..., :out]


def _blocks_used(shape, config) -> int:
    """Blocks whose outputs reach ``y`` ("rotate"): the rest are truncated away."""
    r_hat, groups, _ = geometry(shape, config)
    return min(groups, -(-shape[1] // r_hat))


def init(key, kernel, config: MoraConfig):
    r_hat = config.rank(kernel.shape)
    return {"m": jnp.zeros((r_hat, r_hat), jnp.float32)}, {"kernel": kernel}


def update(x: jax.Array, node: Node, dropout_key=None) -> jax.Array:
    """``f_decomp(M f_comp(dropout(x)))`` in the dtype of ``x``, without forming ``ΔK``."""
    config, out = node.config, node.shape[1]
    r_hat, groups, pad = geometry(node.shape, config)
    m = node.trainable["m"].astype(x.dtype)
    x = base.dropout(x, config.dropout, dropout_key)
    if pad:  # the authors' padding: the first features again, not zeros
        x = jnp.concatenate([x, x[..., :pad]], axis=-1)
    xb = x.reshape(*x.shape[:-1], groups, r_hat)
    if config.compress == "sum":
        return _decompress(xb.sum(axis=-2) @ m, out)
    used = _blocks_used(node.shape, config)
    cos, sin, half = rotation_tables(r_hat, used)
    xb = xb[..., :used, :]
    z = xb * cos.astype(x.dtype) + _rotate_half(xb, half) * sin.astype(x.dtype)
    o = (z @ m).reshape(*x.shape[:-1], used * r_hat)
    return _decompress(o, out)


def delta(node: Node) -> jax.Array:
    """``ΔK`` (in, out) in float32: ``M``'s entries placed by the two maps (gathers, no
    product with the identity). Padded input row ``p`` folds onto row ``p mod in``."""
    config, (n, out) = node.config, node.shape
    r_hat, groups, pad = geometry(node.shape, config)
    m = node.trainable["m"]
    if config.compress == "sum":  # padded row p, column j: M's entry (p mod r̂, j mod r̂)
        rows = jnp.take(m, np.arange(groups * r_hat) % r_hat, axis=0)
        padded = jnp.take(rows, np.arange(out) % r_hat, axis=1)
    else:  # block-diagonal of R_b m (R_b: block b's rotation), columns j mod (g r̂)
        cos, sin, half = rotation_tables(r_hat, groups)
        cos, sin = cos.astype(np.float32), sin.astype(np.float32)
        # row j of R_b m: cos_bj m[j] - s_bj m[π(j)], π swapping j and j ± h (s: the signed sine)
        blocks = cos[:, :, None] * m - sin[:, :, None] * _rotate_half(m.T, half).T  # (g, r̂, r̂)
        col = np.arange(out) % (groups * r_hat)
        hit = np.arange(groups)[:, None] == (col // r_hat)[None, :]  # (g, out): column j in block b
        padded = jnp.where(hit[:, None, :], jnp.take(blocks, col % r_hat, axis=2), 0.0).reshape(groups * r_hat, out)
    d = padded[:n]
    return d.at[:pad].add(padded[n:]) if pad else d


def materialize(node: Node) -> jax.Array:
    return node.frozen["kernel"].astype(jnp.float32) + delta(node)


def factored(x, node: Node, dropout_key=None):
    return x @ node.frozen["kernel"].astype(x.dtype) + update(x, node, dropout_key)


def flops(node: Node, tokens: int):
    n, out = node.shape
    r_hat, groups, pad = geometry(node.shape, node.config)
    width = groups * r_hat
    if node.config.compress == "sum":
        product = 6.0 * tokens * r_hat**2
        # forward: the group sum, the add to y; backward: the repeat's sum and the padding fold
        extra = tokens * (width - r_hat + out + max(out - r_hat, 0) + pad)
    else:
        used = _blocks_used(node.shape, node.config)
        product = 6.0 * tokens * used * r_hat**2
        rotated = used * r_hat
        # rotation forward (2 products, 1 sum) and backward (the same twice over), add to y, folds
        extra = tokens * (3 * rotated + 4 * rotated + out + max(out - rotated, 0) + pad)
    rebuild = 3.0 * width * out  # the gathered/selected entries, forward and back
    return base.frozen_step_flops(node, tokens) + product + extra, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(MoraConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
