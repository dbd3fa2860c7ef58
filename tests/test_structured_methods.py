"""MoRA, SBoRA and HOFT against float64 numpy references of their papers' equations.

Each reference is written in the paper's notation (``W`` out × in, column vectors), from
the equations and the authors' operator definitions, independently of the jpeft code; both
paths are checked after a random update of the trainables.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import linalg
from conftest import assert_close_to_scale, perturb

TOL = dict(rtol=2e-5, atol=2e-5)


def adapt(kernel, method, key=0, **hparams):
    """One (in, out) kernel adapted under ``q/kernel``, its trainables moved off their start."""
    tree = jpeft.apply({"q": {"kernel": jnp.asarray(kernel, jnp.float32)}}, method, key=jax.random.key(key),
                       targets="q/kernel", **hparams)
    return perturb(tree, jax.random.key(key + 100), 0.3)["q"]["kernel"]


def kernel_of(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape) / np.sqrt(shape[0])


def inputs(n, seed=1):
    return np.random.RandomState(seed).randn(6, n)


def both_paths(node, x):
    x32 = jnp.asarray(x, jnp.float32)
    return (np.asarray(jpeft.linear(x32, node, path="factored"), np.float64),
            np.asarray(jpeft.linear(x32, node, path="materialized"), np.float64))


def phi_qkv_count(method, **hparams) -> int:
    """Trainable count on Phi-1.5's 72 Q/K/V matrices (2048 × 2048), from shapes alone."""
    kernel = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)
    shapes = {f"layers_{i}": {n: {"kernel": kernel} for n in ("q_proj", "k_proj", "v_proj")} for i in range(24)}
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **hparams), shapes)
    return jpeft.count_params(abstract)["trainable"]


@pytest.mark.parametrize("method, hparams, count", [
    ("mora", {}, 72 * 256**2),  # r̂ = ⌊√(4096 · 16)⌋ = 256
    ("mora", {"compress": "sum"}, 4_718_592),
    ("sbora", {}, 72 * 16 * 2048),
    ("sbora", {"fixed": "b"}, 2_359_296),
    ("hoft", {}, 72 * 16 * (2048 + 2048)),
    ("hoft", {"scaled": True}, 4_718_592 + 72 * 2048),
])
def test_phi_qkv_counts_from_shapes(method, hparams, count):
    assert phi_qkv_count(method, **hparams) == count


# ------------------------------------------------------------------------------- MoRA


def mora_reference(x, M, n, out, compress):
    """``f_decomp(M f_comp(x))`` per token (rows of ``x``), as the authors' ``_apply_mora``:
    input padded with its first features to whole groups of r̂, groups summed ("sum",
    mora_type 1) or blocks rotated by position (RoPE, mora_type 6) and each mapped by M;
    output j reads entry j mod (length)."""
    r_hat = M.shape[0]
    groups = math.ceil(n / r_hat)
    padded = np.concatenate([x, x[:, : groups * r_hat - n]], axis=1)
    blocks = [padded[:, b * r_hat:(b + 1) * r_hat] for b in range(groups)]
    if compress == "sum":
        o = sum(blocks) @ M.T
    else:
        h = r_hat // 2
        outs = []
        for b, v in enumerate(blocks):
            theta = np.zeros(r_hat)
            theta[:h] = theta[h:2 * h] = b * 10000.0 ** (-2 * np.arange(h) / r_hat)
            turned = np.zeros_like(v)
            turned[:, :h], turned[:, h:2 * h] = -v[:, h:2 * h], v[:, :h]  # odd r̂: last coordinate unrotated
            outs.append((v * np.cos(theta) + turned * np.sin(theta)) @ M.T)
        o = np.concatenate(outs, axis=1)
    return o[:, np.arange(out) % o.shape[1]]


MORA_CASES = [  # (in, out), r -> r̂: divides; padded + truncated (out not a multiple); padded + repeated; odd r̂
    ((32, 32), 4),  # r̂ 16, 2 groups
    ((40, 24), 3),  # r̂ 13: pad 12, out 24 < 52 (rotate: only 2 of 4 blocks reach y)
    ((24, 40), 3),  # r̂ 13: pad 2, out 40 > 26, repeated
    ((32, 64), 4),  # r̂ 19, odd
]


@pytest.mark.parametrize("compress", ["rotate", "sum"])
@pytest.mark.parametrize("shape, r", MORA_CASES)
def test_mora_matches_float64_reference(shape, r, compress):
    n, out = shape
    kernel, x = kernel_of(shape), inputs(n)
    node = adapt(kernel, "mora", r=r, compress=compress)
    m = np.asarray(node.trainable["m"], np.float64)
    r_hat = math.isqrt((n + out) * r)
    assert m.shape == (r_hat, r_hat) and np.abs(m).min() > 0
    M = m.T  # the paper's M maps column vectors
    expected = x @ kernel + mora_reference(x, M, n, out, compress)
    factored, materialized = both_paths(node, x)
    np.testing.assert_allclose(factored, expected, **TOL)
    np.testing.assert_allclose(materialized, expected, **TOL)
    # ΔK by pushing the identity through the reference, against the gathered one
    delta = np.asarray(jpeft.materialize({"k": node})["k"], np.float64) - kernel
    np.testing.assert_allclose(delta, mora_reference(np.eye(n), M, n, out, compress), **TOL)


@pytest.mark.parametrize("method,hp", [("mora", dict(r=3, compress="rotate")), ("mora", dict(r=3, compress="sum")),
                                       ("sbora", dict(r=5, fixed="b"))])
def test_paths_have_the_same_gradients(method, hp):
    node = adapt(kernel_of((40, 24)), method, **hp)
    trainable, frozen = jpeft.partition(node)
    x = jnp.asarray(inputs(40), jnp.float32)

    def loss(t, x, path):
        return jnp.sum(jnp.sin(jpeft.linear(x, jpeft.combine(t, frozen), path=path)))

    gf = jax.grad(loss, argnums=(0, 1))(trainable, x, "factored")
    gm = jax.grad(loss, argnums=(0, 1))(trainable, x, "materialized")
    for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gm)):
        assert_close_to_scale(a, b, 1e-5)


def test_mora_refuses_bad_values():
    tree = {"q": {"kernel": jnp.zeros((32, 32))}}
    with pytest.raises(ValueError, match=r"compress must be one of \('rotate', 'sum'\), got 'blocks'"):
        jpeft.apply(tree, "mora", key=jax.random.key(0), targets="q/kernel", compress="blocks")
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        jpeft.apply(tree, "mora", key=jax.random.key(0), targets="q/kernel", r=0)
    jpeft.apply(tree, "mora", key=jax.random.key(0), targets="q/kernel", r=17)  # r̂ = ⌊√1088⌋ = 32 fits
    with pytest.raises(ValueError, match=r"mora cannot adapt 'q/kernel': r=18 gives r̂ = .* = 33, more than "
                                         r"min\(in, out\) = 32 of a \(32, 32\) kernel.*use r <= 17"):
        jpeft.apply(tree, "mora", key=jax.random.key(0), targets="q/kernel", r=18)
    with pytest.raises(ValueError, match="r=1 gives r̂ = .* = 31, more than min.* = 2 .*no r fits this shape"):
        jpeft.apply({"q": {"kernel": jnp.zeros((2, 1000))}}, "mora", key=jax.random.key(0), targets="q/kernel", r=1)


# ------------------------------------------------------------------------------ SBoRA


@pytest.mark.parametrize("fixed", ["a", "b"])
def test_sbora_matches_float64_reference_and_changes_only_its_region(fixed):
    shape = (40, 24)
    n, out = shape
    kernel, x = kernel_of(shape), inputs(n)
    node = adapt(kernel, "sbora", r=5, alpha=7.0, fixed=fixed)
    index, s = np.asarray(node.frozen["index"]), 7.0 / 5
    assert node.frozen["index"].dtype == jnp.int32
    # paper: W' = W + s·B A_sb (FA) or W + s·B_sb A (FB), one-hot rows / columns e_i
    W = kernel.T
    if fixed == "a":
        A_sb = np.eye(n)[index]  # r × in
        B = np.asarray(node.trainable["b"], np.float64).T  # out × r
        W_new = W + s * B @ A_sb
    else:
        B_sb = np.eye(out)[:, index]  # out × r
        A = np.asarray(node.trainable["a"], np.float64).T  # r × in
        W_new = W + s * B_sb @ A
    factored, materialized = both_paths(node, x)
    np.testing.assert_allclose(factored, x @ W_new.T, **TOL)
    np.testing.assert_allclose(materialized, x @ W_new.T, **TOL)

    merged = np.asarray(jpeft.materialize({"k": node})["k"])
    base = np.asarray(jnp.asarray(kernel, jnp.float32))
    axis = 0 if fixed == "a" else 1  # FA: rows (inputs) of the Flax kernel; FB: columns (outputs)
    others = np.setdiff1d(np.arange(shape[axis]), index)
    assert np.array_equal(np.take(merged, others, axis), np.take(base, others, axis))  # bit-identical
    assert np.all(np.abs(np.take(merged, index, axis) - np.take(base, index, axis)).max(axis=1 - axis) > 0)
    if fixed == "b":  # the factored path leaves the other outputs exactly as the base computes them
        x32 = jnp.asarray(x, jnp.float32)
        plain = np.asarray(x32 @ jnp.asarray(kernel, jnp.float32))
        assert np.array_equal(np.asarray(jpeft.linear(x32, node, path="factored"))[:, others], plain[:, others])


def test_sbora_indices_come_from_the_key():
    tree = {"q": {"kernel": jnp.zeros((64, 48))}}

    def index(key, fixed):
        adapted = jpeft.apply(tree, "sbora", key=jax.random.key(key), targets="q/kernel", r=16, fixed=fixed)
        return np.asarray(adapted["q"]["kernel"].frozen["index"])

    for fixed, dim in (("a", 64), ("b", 48)):
        draws = [index(k, fixed) for k in range(4)]
        for idx in draws:
            assert idx.shape == (16,) and len(set(idx.tolist())) == 16
            assert idx.min() >= 0 and idx.max() < dim
        assert np.array_equal(index(0, fixed), draws[0])  # same key, same choice
        assert len({tuple(sorted(idx.tolist())) for idx in draws}) == 4  # different keys, different choices


def test_sbora_refuses_bad_values():
    tree = {"q": {"kernel": jnp.zeros((64, 8))}}
    with pytest.raises(ValueError, match=r"fixed must be one of \('a', 'b'\) \(SBoRA-FA or SBoRA-FB\), got 'ab'"):
        jpeft.apply(tree, "sbora", key=jax.random.key(0), targets="q/kernel", fixed="ab")
    jpeft.apply(tree, "sbora", key=jax.random.key(0), targets="q/kernel", r=16)  # FA indexes the 64 inputs
    with pytest.raises(ValueError, match=r"sbora cannot adapt 'q/kernel': r=16 exceeds the output dimension 8 "
                                         r"of a \(64, 8\) kernel"):
        jpeft.apply(tree, "sbora", key=jax.random.key(0), targets="q/kernel", r=16, fixed="b")
    with pytest.raises(ValueError, match="r=65 exceeds the input dimension 64"):
        jpeft.apply(tree, "sbora", key=jax.random.key(0), targets="q/kernel", r=65)


def test_sbora_adapter_round_trip_keeps_its_indices(tmp_path):
    from jpeft import checkpoint

    base = {"q": {"kernel": jnp.asarray(kernel_of((40, 24)), jnp.float32)}}
    adapted = perturb(jpeft.apply(base, "sbora", key=jax.random.key(3), targets="q/kernel", r=5), jax.random.key(4))
    checkpoint.save_adapter(tmp_path, adapted)
    loaded = checkpoint.load_adapter(tmp_path, base)["q"]["kernel"]
    node = adapted["q"]["kernel"]
    assert loaded.frozen["index"].dtype == jnp.int32
    np.testing.assert_array_equal(loaded.frozen["index"], node.frozen["index"])
    np.testing.assert_array_equal(jpeft.materialize({"k": loaded})["k"], jpeft.materialize({"k": node})["k"])


# ------------------------------------------------------------------------------- HOFT


def householder_chain(u):
    """H(u_1) ⋯ H(u_r), ``H(u) = I - 2 u uᵀ / uᵀu``; a zero vector is the identity."""
    q = np.eye(u.shape[0])
    for v in u.T:
        if np.any(v):
            q = q @ (np.eye(len(v)) - 2 * np.outer(v, v) / (v @ v))
    return q


@pytest.mark.parametrize("scaled", [False, True])
def test_hoft_matches_float64_reference(scaled):
    shape = (40, 24)
    kernel, x = kernel_of(shape), inputs(shape[0])
    start = jpeft.apply({"q": {"kernel": jnp.asarray(kernel, jnp.float32)}}, "hoft", key=jax.random.key(0),
                        targets="q/kernel", r_u=5, r_v=4, scaled=scaled)["q"]["kernel"]
    w_u = np.asarray(start.trainable["w_u"])  # paired Gaussian vectors, odd count ending in zero
    assert np.array_equal(w_u[:, 0], w_u[:, 1]) and np.array_equal(w_u[:, 2], w_u[:, 3]) and not np.any(w_u[:, 4])
    node = adapt(kernel, "hoft", r_u=5, r_v=4, scaled=scaled)
    t = {k: np.asarray(v, np.float64) for k, v in node.trainable.items()}
    Q_U, Q_V = householder_chain(t["w_u"]), householder_chain(t["w_v"])
    mu = t.get("magnitude", np.ones(shape[1]))
    W_new = Q_U @ np.diag(mu) @ kernel.T @ Q_V  # M' = Q_U diag(μ) M Q_V
    factored, materialized = both_paths(node, x)
    np.testing.assert_allclose(factored, x @ W_new.T, **TOL)
    np.testing.assert_allclose(materialized, x @ W_new.T, **TOL)

    for name in ("w_u", "w_v"):  # orthogonal (exact CWY solve) however far the vectors moved
        q = np.asarray(linalg.householder_product(node.trainable[name]), np.float64)
        np.testing.assert_allclose(q @ q.T, np.eye(len(q)), atol=2e-6)
    if not scaled:  # two orthogonal factors keep the singular values (hyperspherical energy)
        merged = np.asarray(jpeft.materialize({"k": node})["k"], np.float64)
        np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), np.linalg.svd(kernel, compute_uv=False),
                                   rtol=1e-5)


def test_hoft_refuses_bad_values():
    tree = {"q": {"kernel": jnp.zeros((16, 8))}}
    with pytest.raises(ValueError, match=r"hoft cannot adapt 'q/kernel': r_u=9 exceeds the output dimension 8 "):
        jpeft.apply(tree, "hoft", key=jax.random.key(0), targets="q/kernel", r_u=9, r_v=4)
    with pytest.raises(ValueError, match=r"r_v=17 exceeds the input dimension 16 of a \(16, 8\) kernel"):
        jpeft.apply(tree, "hoft", key=jax.random.key(0), targets="q/kernel", r_u=8, r_v=17)
    with pytest.raises(ValueError, match="scaled must be True or False, got 1"):
        jpeft.apply(tree, "hoft", key=jax.random.key(0), targets="q/kernel", r_u=2, r_v=2, scaled=1)
