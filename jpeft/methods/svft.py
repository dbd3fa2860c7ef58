"""SVFT: singular-vector-guided fine-tuning (Lingam, Tejaswi, Vavre, Shetty, Gudur, Ghosh,
Dimakis, Choi, Bojchevski & Sanghavi, NeurIPS 2024).

Paper notation, ``W`` (out × in, ``h = W x``) with thin SVD ``W = U Σ Vᵀ``,
``p = min(in, out)`` (eq. 1–2):

    W' = U (Σ + M) Vᵀ = W + Σ_{(i,j)∈Ω} m_ij u_i v_jᵀ,

``U``, ``Σ``, ``V`` frozen, ``M`` (p × p) sparse and trainable on a fixed pattern Ω. On the
Flax kernel ``K = Wᵀ = V Σ Uᵀ`` (in, out), orientation ``K' = V (Σ + M)ᵀ Uᵀ``:

    y = x K' = mix(x V) Uᵀ,    mix(h) = h (Σ + M)ᵀ,  mix(h)_i = σ_i h_i + Σ_{(i,j)∈Ω} m_ij h_j.

Patterns Ω (``pattern``, ``d``): ``plain`` the diagonal (p entries; ``d`` must be None);
``banded`` ``|i - j| <= d``, ``p(2d+1) - d(d+1)`` entries in row-major order; ``random`` as
many distinct positions as ``banded`` drawn from the key; ``top_k`` the positions of the
as-many largest ``|u_iᵀ v_j|`` (square kernels only: ``u_i`` and ``v_j`` must have one size).
The official code differs in three ways this module does not follow: it starts ``M`` at
a kaiming-normal draw scaled by a trainable ``sigmoid(gate)`` (here ``M = 0``, so ``W' = W``
at init, up to the float32 rounding of the SVD), its random positions may repeat, and its
top-k ranks the signed entries of ``U Vhᵀ`` (not ``Uᵀ V``); here the paper's
``|u_iᵀ v_j|``. HF PEFT has no SVFT.

Arrays: trainable ``m`` (nnz,) float32 in the pattern's order; frozen ``u`` (out × p),
``v`` (in × p), ``sigma0`` (p) in the kernel's dtype, from the float64 host SVD
(:func:`frozen_svd`), and for ``random``/``top_k`` the positions ``rows`` (index into
``U``), ``cols`` (index into ``V``), int32, sorted row-major. ``plain`` and ``banded``
positions are a function of ``(p, d)`` and are not stored. The base rebuilds ``u``, ``v``,
``sigma0`` (:func:`frozen_from_base`); adapters store ``sigma0`` (the base check) and the
key-drawn or base-ranked positions, which define what each ``m`` entry means.

How ``mix`` applies ``M``: ``plain`` multiplies by ``σ + m``; ``random``/``top_k`` gather
the nnz inputs and scatter-add them into their outputs (a custom VJP keeps the residuals at
``h``); ``banded`` scatters ``m`` into dense b × 3b blocks (``b`` = ``d`` rounded up to 8)
and applies them as a block-tridiagonal product, ``6·b`` FLOP per row and element where
the gather/scatter form would need ``2(2d+1)``: on 2 CPU cores the gather/scatter forms of
the mix took 7–60 s for one 2048-wide, 4096-token training step at ``d = 16``, the blocks
0.7 s. (The random/top_k mix stays slow on a CPU; the cost model counts FLOP, not that.)

Paths: factored ``mix(x V) Uᵀ`` costs ``4·T·p·(in+out)`` plus the mix on ``T`` rows and no
weight gradient; materializing ``K' = mix(V) Uᵀ`` costs ``6·T·in·out + 4·in·p·out`` plus the
mix on ``in`` rows. The SVD form costs ``2×`` a frozen dense matmul, so on a square kernel
factored wins for ``T < 2p``; at the Phi-1.5 step (``T = 4096 = 2p``) the matmul terms tie
and the smaller mix (``in`` rows against ``T``) makes the cost model materialize, at about
2× LoRA's FLOP.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node

PATTERNS = ("plain", "banded", "random", "top_k")
BLOCK_MULTIPLE = 8  # banded blocks are at least 8 wide: smaller batched matmuls waste the hardware


@dataclasses.dataclass(frozen=True)
class SvftConfig:
    """pattern: the sparsity pattern Ω of ``M`` (``plain``, ``banded``, ``random``, ``top_k``);
    d: the band half-width ``|i - j| <= d`` of ``banded``, and the same entry count for
    ``random`` and ``top_k`` (None for ``plain``)."""

    pattern: str = "plain"
    d: int | None = None

    def __post_init__(self):
        base.require(self.pattern in PATTERNS, f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.pattern == "plain":
            base.require(self.d is None, f"the plain pattern trains the diagonal of M and takes no d, got d={self.d!r} "
                                         "(d is for the banded, random and top_k patterns)")
        else:
            base.require(self.d is not None, f"the {self.pattern} pattern needs d, a positive integer "
                                             "(band half-width |i - j| <= d, or as many entries), got d=None")
            base.positive_int("d", self.d)

    def check(self, shape: tuple[int, int]) -> None:
        p = min(shape)
        if self.d is not None:
            base.require(self.d < p, f"d={self.d} must be below p = min(in, out) = {p} of a {shape} kernel "
                                     f"(d = {p - 1} already makes M dense)")
        if self.pattern == "top_k":
            base.require(shape[0] == shape[1], f"the top_k pattern ranks |u_i^T v_j| and needs a square kernel "
                                               f"(left and right singular vectors of one size), got {shape}")


def nnz(config: SvftConfig, p: int) -> int:
    """The number of trainable entries of ``M`` (p × p): ``p`` for ``plain``, else the band's
    ``p(2d+1) - d(d+1)``."""
    if config.pattern == "plain":
        return p
    return p * (2 * config.d + 1) - config.d * (config.d + 1)


@functools.lru_cache(maxsize=None)
def band_positions(p: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of ``|i - j| <= d`` in a p × p matrix, row-major, int32."""
    i = np.repeat(np.arange(p), 2 * d + 1).reshape(p, 2 * d + 1)
    j = i + np.arange(-d, d + 1)
    keep = (j >= 0) & (j < p)
    return i[keep].astype(np.int32), j[keep].astype(np.int32)


def frozen_svd(kernel: jax.Array, rank: int | None = None) -> tuple[jax.Array, dict]:
    """``(s, {"u", "v", "sigma0"})`` of the float64 host SVD ``K = V diag(s) Uᵀ``
    (:func:`jpeft.linalg.svd_float64`), top ``rank`` pairs, in the kernel's dtype; ``s`` in float32.

    Each pair's sign is fixed (the largest-magnitude entry of each ``v`` column positive):
    an off-diagonal coefficient ``m_ij u_i v_jᵀ`` flips with one of the two signs, so an
    adapter rebuilt on a LAPACK that returned the other sign must see the same ``u``, ``v``.
    """
    v, s, u = linalg.svd_float64(kernel)
    if rank is not None:
        v, s, u = v[:, :rank], s[:rank], u[:, :rank]
    lead = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=0)[None], axis=0)[0]
    sign = jnp.where(lead < 0, -1.0, 1.0).astype(v.dtype)
    v, u = v * sign, u * sign
    return s, {"u": u.astype(kernel.dtype), "v": v.astype(kernel.dtype), "sigma0": s.astype(kernel.dtype)}


def frozen_from_base(kernel, config: SvftConfig) -> dict:
    """``u``, ``v``, ``sigma0``: what the base determines. ``random``'s positions come from
    the key and ``top_k``'s are kept as trained (a base in another dtype could rank them
    differently), so adapters store those."""
    return frozen_svd(kernel)[1]


def _positions(key, u, v, config: SvftConfig) -> dict:
    p = u.shape[1]
    k = nnz(config, p)
    if config.pattern == "random":
        # the k largest of p² uniforms are a uniform k-subset (jax.random.choice without
        # replacement permutes all p² and takes ~17 s at p = 2048)
        _, flat = jax.lax.top_k(jax.random.uniform(key, (p * p,)), k)
    else:  # top_k: score (i, j) = |u_iᵀ v_j|
        scores = jnp.abs(u.astype(jnp.float32).T @ v.astype(jnp.float32))
        _, flat = jax.lax.top_k(scores.reshape(-1), k)
    flat = jnp.sort(flat)
    return {"rows": (flat // p).astype(jnp.int32), "cols": (flat % p).astype(jnp.int32)}


def init(key, kernel, config: SvftConfig):
    s, frozen = frozen_svd(kernel)
    p = s.shape[0]
    if config.pattern in ("random", "top_k"):
        frozen |= _positions(key, frozen["u"], frozen["v"], config)
    return {"m": jnp.zeros((nnz(config, p),), jnp.float32)}, frozen


def positions(node: Node) -> tuple:
    """``(rows, cols)`` of every trainable entry, in the order of ``m``."""
    p = node.frozen["sigma0"].shape[-1]
    if node.config.pattern == "plain":
        return np.arange(p, dtype=np.int32), np.arange(p, dtype=np.int32)
    if node.config.pattern == "banded":
        return band_positions(p, node.config.d)
    return node.frozen["rows"], node.frozen["cols"]


# --------------------------------------------------------------------------- mix


def block_width(d: int) -> int:
    return -(-d // BLOCK_MULTIPLE) * BLOCK_MULTIPLE


def _band_mix(h, m, p: int, d: int):
    """``h Mᵀ`` for a band of half-width ``d <= b``: the band lies in the block tridiagonal of
    b × b blocks, so output block ``n`` reads input blocks ``n-1, n, n+1`` (``h3``) through
    one dense b × 3b block holding row ``n``'s entries."""
    b = block_width(d)
    nb = -(-p // b)
    rows, cols = band_positions(p, d)
    blk = rows // b
    # add, not set: the positions are distinct, and set's transpose masks duplicates (an
    # nnz-wide reduction XLA constant-folds for seconds)
    w = jnp.zeros((nb, b, 3 * b), h.dtype).at[blk, rows % b, cols - (blk - 1) * b].add(
        m.astype(h.dtype), indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")
    lead = h.shape[:-1]
    hb = jnp.pad(h, [(0, 0)] * len(lead) + [(0, nb * b - p)]).reshape(*lead, nb, b)
    zero = jnp.zeros_like(hb[..., :1, :])
    h3 = jnp.concatenate([jnp.concatenate([zero, hb[..., :-1, :]], -2), hb,
                          jnp.concatenate([hb[..., 1:, :], zero], -2)], -1)
    return jnp.einsum("...nc,nac->...na", h3, w).reshape(*lead, nb * b)[..., :p]


def _gather_scatter(h, m, src, dst):
    """``out[dst_k] += m_k · h[src_k]`` along the leading axis: whole rows move, which XLA's
    CPU gathers and scatters do ~2.5× faster than single elements of the last axis."""
    moved = h[src] * m.astype(h.dtype).reshape((-1,) + (1,) * (h.ndim - 1))
    return jnp.zeros_like(h).at[dst].add(moved, mode="promise_in_bounds")


@jax.custom_vjp
def _scatter_mix(h, m, rows, cols):
    """``h Mᵀ`` for arbitrary positions: gather the nnz inputs, scatter-add into their outputs."""
    return jnp.moveaxis(_gather_scatter(jnp.moveaxis(h, -1, 0), m, cols, rows), 0, -1)


def _scatter_mix_fwd(h, m, rows, cols):
    return _scatter_mix(h, m, rows, cols), (h, m, rows, cols)


def _scatter_mix_bwd(res, g):
    # residuals are h, not the (nnz × rows) gather autodiff would keep for every layer
    h, m, rows, cols = res
    gt = jnp.moveaxis(g, -1, 0)
    dh = jnp.moveaxis(_gather_scatter(gt, m, rows, cols), 0, -1)
    ht = jnp.moveaxis(h, -1, 0)
    dm = jnp.sum((ht[cols] * gt[rows]).reshape(m.shape[0], -1).astype(jnp.float32), axis=1)
    return dh, dm.astype(m.dtype), None, None


_scatter_mix.defvjp(_scatter_mix_fwd, _scatter_mix_bwd)


def mix(h, node: Node):
    """``h (Σ + M)ᵀ`` on the last axis of ``h`` (p), in ``h``'s dtype."""
    t, f, config = node.trainable, node.frozen, node.config
    if config.pattern == "plain":
        return h * (f["sigma0"].astype(jnp.float32) + t["m"]).astype(h.dtype)
    scaled = h * f["sigma0"].astype(h.dtype)
    if config.pattern == "banded":
        return scaled + _band_mix(h, t["m"], h.shape[-1], config.d)
    return scaled + _scatter_mix(h, t["m"], f["rows"], f["cols"])


def materialize(node: Node) -> jax.Array:
    """``K' = mix(V) Uᵀ`` in float32."""
    f = node.frozen
    return mix(f["v"].astype(jnp.float32), node) @ f["u"].astype(jnp.float32).T


def factored(x, node: Node, dropout_key=None):
    f = node.frozen
    return mix(x @ f["v"].astype(x.dtype), node) @ f["u"].T.astype(x.dtype)


def mix_flops(node: Node, rows: int, input_gradient: bool) -> float:
    """FLOP of ``mix`` on ``rows`` rows in a training step: forward, the gradient of ``m`` and,
    with ``input_gradient``, that of the input (the factored path; ``V`` gets none)."""
    p = node.frozen["sigma0"].shape[-1]
    config = node.config
    if config.pattern == "plain":
        return rows * p * (4.0 if input_gradient else 3.0)
    k = nnz(config, p)
    elementwise = rows * p * (2.0 if input_gradient else 1.0)  # h σ and the sum (and dg σ)
    if config.pattern == "banded":
        b = block_width(config.d)
        block = 2.0 * rows * (-(-p // b)) * b * 3 * b  # one block-tridiagonal product
        return elementwise + block * (3 if input_gradient else 2)
    return elementwise + rows * k * (6.0 if input_gradient else 4.0)


def flops(node: Node, tokens: int):
    n, m = node.shape
    p = node.frozen["sigma0"].shape[-1]
    factored_cost = 4.0 * tokens * p * (n + m) + mix_flops(node, tokens, True)
    rebuild = 4.0 * n * p * m + mix_flops(node, n, False)
    return factored_cost, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(SvftConfig, init, materialize, factored, flops, frozen_from_base=frozen_from_base)
