"""Numerical kernels against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jpeft import linalg
from conftest import decaying_matrix


def explicit_reflections(u):
    """H(u_0) ⋯ H(u_{k-1}) by explicit float64 products, zero columns as the identity."""
    u = np.asarray(u, np.float64)
    h = np.eye(u.shape[0])
    for col in u.T:
        tau = col @ col / 2
        if tau > 0:
            h = h @ (np.eye(len(col)) - np.outer(col, col) / tau)
    return h


def test_cwy_equals_explicit_product_float64():
    with jax.enable_x64(True):
        u = jax.random.normal(jax.random.key(0), (24, 7), jnp.float64)
        u = u.at[:, 3].set(0.0)  # a zero vector is the identity reflection
        expected = explicit_reflections(u)
        np.testing.assert_allclose(linalg.householder_product(u), expected, atol=1e-13)
        x = jax.random.normal(jax.random.key(1), (3, 5, 24), jnp.float64)
        np.testing.assert_allclose(linalg.apply_householder(x, u), x @ expected, atol=1e-12)
        np.testing.assert_allclose(linalg.apply_householder(x, u, transpose=True), x @ expected.T, atol=1e-12)


def test_paired_init_is_identity():
    for count in (1, 4, 5):
        u = linalg.paired_householder_init(jax.random.key(2), 16, count)
        assert u.shape == (16, count)
        np.testing.assert_allclose(linalg.householder_product(u), np.eye(16), atol=1e-6)
    u = linalg.paired_householder_init(jax.random.key(2), 16, 5)
    assert float(jnp.abs(u[:, -1]).max()) == 0.0  # odd count: trailing zero vector
    np.testing.assert_array_equal(u[:, 0], u[:, 1])
    assert float(jnp.abs(u).max()) <= 1.0


def test_cayley_is_orthogonal_and_neumann_approximates_it():
    with jax.enable_x64(True):
        vec = jax.random.normal(jax.random.key(3), (5, 28), jnp.float64)
        q = linalg.skew_from_vector(vec, 8)
        np.testing.assert_allclose(q, -jnp.swapaxes(q, -1, -2))
        r = linalg.cayley(q)
        np.testing.assert_allclose(r @ jnp.swapaxes(r, -1, -2), np.broadcast_to(np.eye(8), r.shape), atol=1e-12)
        np.testing.assert_allclose(jnp.linalg.det(r), 1.0, atol=1e-10)
        expected = np.stack([(np.eye(8) + qi) @ np.linalg.inv(np.eye(8) - qi) for qi in np.asarray(q)])
        np.testing.assert_allclose(r, expected, atol=1e-12)
        small = 0.01 * q
        err = [float(jnp.abs(linalg.cayley(small, t) - linalg.cayley(small)).max()) for t in (2, 4, 12)]
        assert err[0] > err[1] > err[2] and err[2] < 1e-12


def test_inverse_positive_real_float64_and_derivatives():
    """The LAPACK-free inverse (Gauss–Jordan without pivoting, what a CPU runs) is exact for
    I - Q with a large skew Q and for a non-symmetric matrix with SPD symmetric part, and
    its derivatives (forward and reverse, to second order) match finite differences."""
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(20), 3)
        q = linalg.skew_from_vector(3.0 * jax.random.normal(k1, (3, 120), jnp.float64), 16)  # ||Q|| ≈ 30
        g = jax.random.normal(k2, (16, 16), jnp.float64)
        k = jax.random.normal(k3, (16, 16), jnp.float64)
        mats = jnp.concatenate([jnp.eye(16) - q, (g @ g.T / 16 + jnp.eye(16) + k - k.T)[None]])
        inv = linalg.inverse_positive_real(mats)
        np.testing.assert_allclose(inv, np.linalg.inv(np.asarray(mats)), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(jax.vmap(linalg.inverse_positive_real)(mats), inv, rtol=1e-12, atol=1e-14)
        check_grads(linalg.inverse_positive_real, (mats[-2:, :6, :6],), order=2, modes=("fwd", "rev"))
        r = linalg.cayley(q)
        np.testing.assert_allclose(r @ jnp.swapaxes(r, -1, -2), np.broadcast_to(np.eye(16), r.shape), atol=1e-12)
    r32 = linalg.cayley(q.astype(jnp.float32))  # float32: orthogonal to rounding even at ||Q|| ≈ 30
    assert float(jnp.abs(r32 @ jnp.swapaxes(r32, -1, -2) - jnp.eye(16)).max()) < 2e-5


@pytest.mark.parametrize("transpose", [False, True])
def test_solve_upper_triangular_float64_and_derivatives(transpose):
    with jax.enable_x64(True):
        k1, k2 = jax.random.split(jax.random.key(21))
        t = jnp.triu(jax.random.normal(k1, (7, 7), jnp.float64)) + 3 * jnp.eye(7)
        z = jax.random.normal(k2, (7, 5), jnp.float64)
        x = linalg.solve_upper_triangular(t, z, transpose=transpose)
        np.testing.assert_allclose(x, np.linalg.solve(np.asarray(t.T if transpose else t), np.asarray(z)), atol=1e-12)
        batched = jax.vmap(lambda t, z: linalg.solve_upper_triangular(t, z, transpose=transpose))(
            jnp.stack([t, 2 * t]), jnp.stack([z, z]))
        np.testing.assert_allclose(batched[1], x / 2, atol=1e-12)
        upper = lambda t, z: linalg.solve_upper_triangular(jnp.triu(t), z, transpose=transpose)  # noqa: E731
        check_grads(upper, (t, z), order=2, modes=("fwd", "rev"))


def test_step_solves_lower_without_lapack_on_cpu_and_with_vendor_kernels_on_gpu():
    """jaxlib 0.10's batched CPU LAPACK calls deadlock a step with ~10 concurrent solves: the
    CPU lowering of a Cayley + CWY gradient has no custom call at all, the CUDA lowering
    keeps cuSOLVER's LU and cuBLAS' triangular solve."""
    def step(q, u, x):
        rotated = x @ linalg.block_diag(linalg.cayley(q - jnp.swapaxes(q, -1, -2)))
        return jnp.sum(jax.vmap(linalg.apply_householder, (None, 0))(rotated, u) ** 2)

    args = (jnp.zeros((2, 4, 4)), jnp.ones((3, 8, 2)), jnp.ones((5, 8)))
    traced = jax.jit(jax.grad(step, argnums=(0, 1))).trace(*args)
    assert "custom_call" not in traced.lower().as_text()
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "cusolver_getrf" in cuda and "triangular_solve" in cuda


def test_block_diag_and_its_application():
    blocks = jax.random.normal(jax.random.key(4), (3, 4, 4))
    x = jax.random.normal(jax.random.key(5), (2, 12))
    dense = linalg.block_diag(blocks)
    np.testing.assert_allclose(dense[4:8, 4:8], blocks[1])
    assert float(jnp.abs(dense[:4, 4:]).max()) == 0.0
    np.testing.assert_allclose(linalg.apply_block_diag(x, blocks), x @ dense, atol=1e-5)


def test_kron_application():
    a = jax.random.normal(jax.random.key(6), (4, 3))
    b = jax.random.normal(jax.random.key(7), (5, 2))
    x = jax.random.normal(jax.random.key(8), (7, 20))
    np.testing.assert_allclose(linalg.apply_kron(x, a, b), x @ np.kron(a, b), atol=1e-5)
    assert linalg.kron_factorization(2048) == (32, 64)
    assert linalg.kron_factorization(127) == (1, 127)
    assert linalg.kron_factorization(128, 4) == (4, 32)


def test_butterfly_permutation_matches_definition():
    # 16 features, blocks of 4 split into halves of 2: even halves first inside each group.
    np.testing.assert_array_equal(
        linalg.butterfly_permutation(16, 2, 2), [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    )
    np.testing.assert_array_equal(linalg.butterfly_permutation(16, 4, 2), np.arange(16))
    p = linalg.permutation_matrix(linalg.butterfly_permutation(16, 2, 2))
    np.testing.assert_array_equal(p @ p.T, np.eye(16))


@pytest.mark.parametrize("shape,k", [((96, 96), 20), ((128, 48), 12), ((40, 120), 16)])
def test_randomized_svd_near_optimal(shape, k):
    a = decaying_matrix(jax.random.key(9), shape, decay=0.9)
    u, s, v = linalg.randomized_svd(jax.random.key(10), a, k, oversample=8, power_iters=2)
    assert u.shape == (shape[0], k) and s.shape == (k,) and v.shape == (shape[1], k)
    err = np.linalg.norm(a - (u * s) @ v.T)
    sv = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(sv[k:] ** 2))
    assert err <= 1.5 * optimal, (err, optimal)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-5)


def test_svd_float64_reconstructs_to_float32_precision():
    a = jax.random.normal(jax.random.key(11), (256, 192))
    u, s, v = jax.jit(linalg.svd_float64)(a)
    rel = np.linalg.norm((u * s) @ v.T - a) / np.linalg.norm(a)
    assert rel < 1e-6


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(2, 12), count=st.integers(1, 6), seed=st.integers(0, 2**16), zero=st.booleans())
def test_cwy_property_any_shape(dim, count, seed, zero):
    """For any vectors (a zero one included), CWY = explicit product, and it is orthogonal."""
    with jax.enable_x64(True):
        u = jax.random.normal(jax.random.key(seed), (dim, count), jnp.float64)
        if zero:
            u = u.at[:, seed % count].set(0.0)
        h = linalg.householder_product(u)
        np.testing.assert_allclose(h, explicit_reflections(u), atol=1e-10)
        np.testing.assert_allclose(h @ h.T, np.eye(dim), atol=1e-10)
