"""Numerical kernels shared by the methods.

Everything here is a pure function of arrays, differentiable and batchable. Orthogonal
factors are built in float32 (or float64 when the input is float64), whatever the
compute dtype of the model, because the Cayley solve and the CWY triangular solve lose
orthogonality quickly in bf16.

The linear solves of a training step (the Cayley transform's inverse, the CWY triangular
solve) never call LAPACK on a CPU. jaxlib 0.10's CPU LAPACK kernels (``getrf``, ``potrf``,
``geqrf``, batched ``trsm``) split a batched call into sub-tasks on XLA's CPU thread pool
and block a worker until they finish; a step runs one such call per adapted layer at
once, and from about ten of them every worker waits and the step deadlocks (jax 0.9.2
did not). On a CPU these solves are therefore short ``jnp`` loops, which cannot block;
on every other platform they are the vendor's batched kernels (cuSOLVER, cuBLAS).
``jax.lax.platform_dependent`` makes the choice when the step is lowered, so one traced
function serves both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy import linalg as jsp_linalg

Array = jax.Array


def factor_dtype(x: Array) -> jnp.dtype:
    """float64 stays float64; everything else (bf16, f16, f32) is promoted to float32."""
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


# --------------------------------------------------------------------------- Cayley


def skew_from_vector(vec: Array, size: int) -> Array:
    """Skew-symmetric ``Q`` (``..., size, size``) from its strict upper triangle.

    ``vec[..., j]`` fills ``Q[rows[j], cols[j]]`` with ``rows, cols = triu_indices(size, 1)``
    (row-major, the order HF PEFT's OFT uses), and ``Q[cols, rows] = -vec``.
    """
    rows, cols = np.triu_indices(size, 1)
    q = jnp.zeros((*vec.shape[:-1], size, size), vec.dtype)
    q = q.at[..., rows, cols].set(vec)
    return q - jnp.swapaxes(q, -1, -2)


def _gauss_jordan_inverse(a: Array) -> Array:
    """``a^{-1}`` (batched) by Gauss–Jordan elimination without pivoting: a ``fori_loop`` of
    ``n`` rank-1 updates, pure ``jnp`` (no LAPACK). Needs non-vanishing pivots, which
    :func:`inverse_positive_real` guarantees.

    Step ``k`` with pivot ``p = a[k, k]``, ``e = e_k`` and ``r = (a[k, :] with 1 at k) / p``:
    ``a ← a·diag(1 - e) + e eᵀ - (a[:, k] - e) rᵀ``, which is the usual in-place update
    (``a[i, j] -= a[i, k] a[k, j] / p``, row ``k`` divided by ``p``, column ``k`` becoming
    ``-a[i, k] / p`` and the pivot ``1 / p``) as one fused expression.
    """
    n = a.shape[-1]
    index = jnp.arange(n)

    def eliminate(k, a):
        e = (index == k).astype(a.dtype)
        row = lax.dynamic_index_in_dim(a, k, axis=-2, keepdims=False)
        col = lax.dynamic_index_in_dim(a, k, axis=-1, keepdims=False)
        pivot = lax.dynamic_index_in_dim(row, k, axis=-1, keepdims=True)
        r = (row * (1 - e) + e) / pivot
        return a * (1 - e) + e[:, None] * e - (col - e)[..., :, None] * r[..., None, :]

    return lax.fori_loop(0, n, eliminate, a)


@jax.custom_jvp
def inverse_positive_real(a: Array) -> Array:
    """``a^{-1}`` for a (batch of) square ``a`` whose symmetric part is positive definite.

    On a CPU, Gauss–Jordan elimination without pivoting in ``jnp`` (see the module note on
    LAPACK); elsewhere ``jnp.linalg.inv`` (LU with pivoting). No pivoting is needed: each
    pivot is a diagonal entry of a Schur complement of ``a``, and the Schur complements of
    a matrix with positive-definite symmetric part have one too (Golub & Van Loan, *Matrix
    Computations*, §4.2, nonsymmetric positive definite systems). For ``a = I - Q`` with
    ``Q`` skew, each Schur complement is ``I + (PSD) + (skew)``, so every pivot is at least
    1: nothing is ever divided by a small number. The derivative
    ``d(a^{-1}) = -a^{-1} da a^{-1}`` is two matmuls, so the backward pass solves nothing.
    """
    return lax.platform_dependent(a, cpu=_gauss_jordan_inverse, default=jnp.linalg.inv)


@inverse_positive_real.defjvp
def _inverse_positive_real_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    x = inverse_positive_real(a)
    return x, -(x @ da @ x)


def cayley(q: Array, neumann_terms: int | None = None) -> Array:
    """Cayley transform ``R = (I + Q)(I - Q)^{-1}`` of skew-symmetric ``Q`` (batched).

    ``R`` is orthogonal with det 1 for every skew ``Q`` and ``R = I`` at ``Q = 0``
    (thesis eq. 5.2; Liu et al., "Controlling Text-to-Image Diffusion by Orthogonal
    Finetuning", 2023). Since ``I + Q = 2I - (I - Q)``, the exact transform is
    ``R = 2 (I - Q)^{-1} - I``: one inverse of ``I - Q``, whose symmetric part is ``I``
    (:func:`inverse_positive_real`, which never deadlocks a CPU step).

    With ``neumann_terms = t`` the inverse is replaced by the truncated Neumann series
    ``(I - Q)^{-1} ≈ sum_{j<t} Q^j`` (HOFT, arXiv 2505.16531; HF PEFT's
    ``num_cayley_neumann_terms`` is ``t + 1``): matmuls only, accurate while ``||Q|| << 1``,
    and no longer exactly orthogonal.
    """
    size = q.shape[-1]
    eye = jnp.eye(size, dtype=q.dtype)
    if neumann_terms is None:
        return 2 * inverse_positive_real(eye - q) - eye
    series, power = eye, eye
    for _ in range(neumann_terms - 1):
        power = power @ q
        series = series + power
    return (eye + q) @ series


def block_diag(blocks: Array) -> Array:
    """Dense block-diagonal matrix from ``blocks`` of shape (num_blocks, b, b)."""
    num, b, _ = blocks.shape
    eye = jnp.eye(num, dtype=blocks.dtype)
    return jnp.einsum("ij,iab->iajb", eye, blocks).reshape(num * b, num * b)


def apply_block_diag(x: Array, blocks: Array) -> Array:
    """``x @ block_diag(blocks)`` without forming it: O(T·d·b) instead of O(T·d²)."""
    num, b, _ = blocks.shape
    y = jnp.einsum("...ka,kab->...kb", x.reshape(*x.shape[:-1], num, b), blocks.astype(x.dtype))
    return y.reshape(x.shape)


# -------------------------------------------------------------------- Householder / CWY


def cwy_triangle(u: Array) -> Array:
    """The upper-triangular ``T`` of the compact WY form of ``H(u_0) ⋯ H(u_{k-1})``.

    ``H(u) = I - u uᵀ / τ`` with ``τ = ||u||² / 2`` (thesis eq. 6.4). For ``U = [u_0 … u_{k-1}]``
    (columns), ``H(u_0) ⋯ H(u_{k-1}) = I - U T^{-1} Uᵀ`` with ``T = triu(UᵀU)`` and its
    diagonal halved (Joffrain et al., "Accumulating Householder transformations,
    revisited", ACM TOMS 2006; thesis Theorem 1). A zero column has ``τ = 0``; it is the
    identity reflection, and a unit diagonal entry makes it drop out exactly (its row and
    column of ``T`` are otherwise zero and its column of ``U`` is zero).
    """
    gram = u.T @ u
    diag = jnp.diagonal(gram) / 2
    diag = jnp.where(diag == 0, jnp.ones_like(diag), diag)
    return jnp.triu(gram, 1) + jnp.diag(diag)


def _substitute(t: Array, z: Array, transpose: bool) -> Array:
    """``t^{-1} z`` (``t^{-T} z``) for upper-triangular ``t`` by back (forward) substitution:
    a ``fori_loop`` of ``k`` row updates, pure ``jnp`` (no LAPACK)."""
    system = jnp.swapaxes(t, -1, -2) if transpose else t  # lower-triangular when transposed
    k = t.shape[-1]

    def substitute(step, x):
        i = step if transpose else k - 1 - step
        row = lax.dynamic_index_in_dim(system, i, axis=-2, keepdims=False)  # unsolved x rows are still 0
        rhs = lax.dynamic_index_in_dim(z, i, axis=-2, keepdims=False)
        pivot = lax.dynamic_index_in_dim(row, i, axis=-1, keepdims=True)
        xi = (rhs - jnp.einsum("...k,...kc->...c", row, x)) / pivot
        return lax.dynamic_update_index_in_dim(x, xi, i, axis=-2)

    return lax.fori_loop(0, k, substitute, jnp.zeros_like(z))


def solve_upper_triangular(t: Array, z: Array, *, transpose: bool = False) -> Array:
    """``t^{-1} z`` (``t^{-T} z`` with ``transpose``) for upper-triangular ``t`` (k × k) with a
    non-zero diagonal and ``z`` (k × m), batched over leading axes.

    On a CPU a substitution loop in ``jnp`` (see the module note on LAPACK); elsewhere
    ``jax.scipy.linalg.solve_triangular``. Differentiated implicitly through
    ``lax.custom_linear_solve``: the backward pass is one solve with the transposed system.
    """

    def solver(transposed: bool):
        cpu = lambda b: _substitute(t, b, transposed)  # noqa: E731
        default = lambda b: jsp_linalg.solve_triangular(t, b, lower=False, trans=int(transposed))  # noqa: E731
        return lambda _, b: lax.platform_dependent(b, cpu=cpu, default=default)

    t_of = (lambda x: jnp.swapaxes(t, -1, -2) @ x) if transpose else (lambda x: t @ x)
    return lax.custom_linear_solve(t_of, z, solve=solver(transpose), transpose_solve=solver(not transpose))


def householder_product(u: Array) -> Array:
    """Explicit ``H(u_0) ⋯ H(u_{k-1}) = I - U T^{-1} Uᵀ`` (d × d), by a triangular solve."""
    t = cwy_triangle(u)
    return jnp.eye(u.shape[0], dtype=u.dtype) - u @ solve_upper_triangular(t, u.T)


def apply_householder(x: Array, u: Array, *, transpose: bool = False) -> Array:
    """``x @ H`` (or ``x @ Hᵀ``) for ``H = H(u_0) ⋯ H(u_{k-1})``, in O(T·d·k).

    ``x @ H = x - ((x U) T^{-1}) Uᵀ`` and ``x @ Hᵀ = x - ((x U) T^{-ᵀ}) Uᵀ``; the products
    with ``T^{-1}`` are triangular solves on the small (k × T) block (the UT transform).
    ``u`` is float32; the activation matmuls run in ``x.dtype``.
    """
    t = cwy_triangle(u)
    ux = u.astype(x.dtype)
    z = (x @ ux).reshape(-1, u.shape[1]).T.astype(u.dtype)  # (k, T)
    # (z.T T^{-1}).T = T^{-T} z   and   (z.T T^{-T}).T = T^{-1} z
    w = solve_upper_triangular(t, z, transpose=not transpose)
    return x - (w.T.astype(x.dtype) @ ux.T).reshape(x.shape)


def paired_householder_init(key: Array, dim: int, count: int, dtype=jnp.float32) -> Array:
    """Householder vectors (dim × count) whose product is exactly the identity (thesis §6.5).

    Vectors come in equal consecutive pairs drawn from U[-1, 1], so each pair of
    reflections cancels; an odd count ends with a zero vector (the identity reflection).
    """
    half = jax.random.uniform(key, (dim, count // 2), dtype, -1.0, 1.0)
    u = jnp.repeat(half, 2, axis=1)
    if count % 2:
        u = jnp.concatenate([u, jnp.zeros((dim, 1), dtype)], axis=1)
    return u


# ------------------------------------------------------------------------ Butterfly


def butterfly_permutation(dim: int, num_blocks: int, half_block: int, enabled: bool = True) -> np.ndarray:
    """Index vector of one block-butterfly permutation (BOFT; Liu et al., ICLR 2024).

    Splits ``dim`` into ``num_blocks`` groups and, inside each, moves the even chunks of
    ``half_block`` elements before the odd ones: the Cooley–Tukey interleaving that
    connects every input to every output after log2(dim / block) factors. The same index
    order as HF PEFT's ``block_butterfly_perm``; ``enabled=False`` is the identity (a
    single-factor BOFT is OFT).
    """
    if not enabled:
        return np.arange(dim)
    if num_blocks * half_block * 2 > dim:
        raise ValueError(f"butterfly: {num_blocks} blocks of 2x{half_block} do not fit in {dim}")
    group = dim // num_blocks
    chunks = group // half_block
    order = np.concatenate([np.arange(0, chunks, 2), np.arange(1, chunks, 2)])
    within = (order[:, None] * half_block + np.arange(half_block)).reshape(-1)
    return (np.arange(0, dim, group)[:, None] + within[None, :]).reshape(-1)


def permutation_matrix(indices: np.ndarray) -> np.ndarray:
    """``P`` with ``P[i, indices[i]] = 1``, so ``(P v)_i = v[indices[i]]``."""
    p = np.zeros((len(indices), len(indices)), np.float32)
    p[np.arange(len(indices)), indices] = 1
    return p


# ---------------------------------------------------------------------------- SVD


def svd_float64(a: Array) -> tuple[Array, Array, Array]:
    """Thin SVD ``a = U diag(s) Vᵀ`` computed in float64 on the host, returned in float32.

    A float32 SVD reconstructs a 2048 × 2048 matrix only to ~2e-6 relative error; the
    float64 one rounded to float32 stays below 5e-7, so SHOFT starts at ``M`` to float32
    precision. It runs through ``jax.pure_callback`` and so works under ``jit``; under
    ``jax.eval_shape`` it is never executed. Returns ``U`` (m × p), ``s`` (p), ``V`` (n × p).
    """
    m, n = a.shape
    p = min(m, n)
    out = (
        jax.ShapeDtypeStruct((m, p), jnp.float32),
        jax.ShapeDtypeStruct((p,), jnp.float32),
        jax.ShapeDtypeStruct((n, p), jnp.float32),
    )

    def host(x):
        u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
        return u.astype(np.float32), s.astype(np.float32), np.ascontiguousarray(vt.T).astype(np.float32)

    return jax.pure_callback(host, out, a, vmap_method="sequential")


# ---------------------------------------------------------------- Randomized SVD


def randomized_svd(
    key: Array, a: Array, rank: int, *, oversample: int = 10, power_iters: int = 2
) -> tuple[Array, Array, Array]:
    """Rank-``rank`` SVD ``a ≈ U diag(s) Vᵀ`` by randomized range finding.

    Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 2011,
    Algorithms 4.4 (randomized subspace iteration) and 5.1: sample ``Y = A Ω`` with a
    Gaussian ``Ω`` of ``rank + oversample`` columns, re-orthonormalize through
    ``power_iters`` rounds of ``A Aᵀ`` (sharpening a slowly decaying spectrum), project
    ``B = Qᵀ A`` and take the SVD of the small ``B``. Returns ``U`` (m × rank), ``s``
    (rank,), ``V`` (n × rank), computed in float32 (float64 for float64 input).
    """
    a = a.astype(factor_dtype(a))
    m, n = a.shape
    width = min(rank + oversample, m, n)
    omega = jax.random.normal(key, (n, width), a.dtype)
    q, _ = jnp.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(a.T @ q)
        q, _ = jnp.linalg.qr(a @ z)
    ub, s, vt = jnp.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank].T


# --------------------------------------------------------------------- Kronecker


def kron_factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim = p · q`` with ``p <= q`` (LyCORIS/PEFT ``factorization``).

    ``factor > 0`` dividing ``dim`` gives ``(factor, dim // factor)`` as given; ``factor =
    -1`` gives the pair closest to ``sqrt(dim)``; otherwise the largest divisor up to
    ``factor`` that keeps ``p + q`` decreasing.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    p, q = 1, dim
    while p < q:
        nxt = p + 1
        while dim % nxt:
            nxt += 1
        if nxt + dim // nxt > p + q or nxt > limit:
            break
        p, q = nxt, dim // nxt
    return (p, q) if p <= q else (q, p)


def kron(a: Array, b: Array) -> Array:
    """Kronecker product ``a ⊗ b`` (thesis eq. 4.3)."""
    return jnp.kron(a, b)


def apply_kron(x: Array, a: Array, b: Array) -> Array:
    """``x @ (a ⊗ b)`` without forming it, for ``a`` (p × s) and ``b`` (q × t).

    With ``x`` reshaped to (…, p, q): ``(x @ (a ⊗ b))[…, s, t] = Σ_{p,q} x[p,q] a[p,s] b[q,t]``,
    costing O(T·(p·q·t + p·s·t)) instead of O(T·pq·st).
    """
    p, s = a.shape
    q, t = b.shape
    xr = x.reshape(*x.shape[:-1], p, q)
    y = jnp.einsum("...pq,qt->...pt", xr, b.astype(x.dtype))
    y = jnp.einsum("...pt,ps->...st", y, a.astype(x.dtype))
    return y.reshape(*x.shape[:-1], s * t)
