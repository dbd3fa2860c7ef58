"""SVFT and LoRA-XS against float64 NumPy references of their papers' equations, SVFT's
sparsity patterns, bad inputs, Phi-1.5 counts from shapes, LoRA-XS's init bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods import loraxs, svft
from conftest import perturb, rel_err

SQUARE, WIDE, TALL = (32, 32), (24, 40), (40, 24)


def kernel_of(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[0])


def adapt(kernel, method, key=1, **hp):
    return jpeft.apply({"k": kernel}, method, key=jax.random.key(key), targets="k", **hp)["k"]


def trained(kernel, method, **hp):
    """A node moved off its start by a random update of every trainable array."""
    return perturb({"k": adapt(kernel, method, **hp)}, jax.random.key(7), 0.1)["k"]


# ----------------------------------------------------------------- references (float64)


def reference_svd(w):
    """Thin SVD ``w = U diag(s) Vᵀ`` with each pair's sign fixed so that the largest-magnitude
    entry of each ``V`` column is positive."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    v = vt.T
    flip = np.sign(v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])])
    return u * flip, s, v * flip


def svft_reference(kernel, m, rows, cols):
    """SVFT eq. (1) on the paper's ``W = Kᵀ`` (out × in): ``W' = U (Σ + M) Vᵀ``; returns ``W'ᵀ``."""
    u, s, v = reference_svd(np.asarray(kernel, np.float64).T)
    mm = np.zeros((len(s), len(s)))
    mm[np.asarray(rows), np.asarray(cols)] = np.asarray(m, np.float64)
    return (u @ (np.diag(s) + mm) @ v.T).T


def loraxs_reference(kernel, r_matrix):
    """LoRA-XS on row vectors, ``h = x W + x A R B`` with ``W`` the (in × out) kernel,
    ``A = U_r Σ_r``, ``B = V_rᵀ`` (``U`` input side, sign fixed on its largest entry)."""
    k = np.asarray(kernel, np.float64)
    v_out, s, u_in = reference_svd(k.T)  # kernel = u_in diag(s) v_outᵀ
    r = r_matrix.shape[0]
    return k + (u_in[:, :r] * s[:r]) @ np.asarray(r_matrix, np.float64) @ v_out[:, :r].T


def band_reference(p, d):
    return np.nonzero(np.abs(np.arange(p)[:, None] - np.arange(p)[None, :]) <= d)


@jax.jit
def both_paths(node, x):
    """``W'``, and per path ``y = x W'`` with the gradients of ``sum(sin(y))`` (one compile)."""
    trainable, frozen = jpeft.partition(node)
    out = {"merged": jpeft.materialize({"k": node})["k"]}
    for path in ("factored", "materialized"):
        y, pullback = jax.vjp(lambda t, x: jpeft.linear(x, jpeft.combine(t, frozen), path=path), trainable, x)
        out[path] = (y, *pullback(jnp.cos(y)))
    return out


def check_paths(node, expected, seed=3):
    """``W'`` and both paths of ``jpeft.linear`` against the reference kernel; the two paths'
    gradients (trainables and ``x``) against each other."""
    x = jax.random.normal(jax.random.key(seed), (2, 3, node.shape[0]))
    out = both_paths(node, x)
    assert rel_err(out["merged"], expected) < 2e-6
    y64 = np.asarray(x, np.float64) @ expected
    for path in ("factored", "materialized"):
        assert out[path][0].shape == y64.shape and rel_err(out[path][0], y64) < 5e-6, path
    (_, dt_f, dx_f), (_, dt_m, dx_m) = out["factored"], out["materialized"]
    grads_f, grads_m = jax.tree_util.tree_leaves(dt_f.trainable), jax.tree_util.tree_leaves(dt_m.trainable)
    assert max(float(jnp.abs(g).max()) for g in grads_f) > 1e-2
    for a, b in zip(grads_f + [dx_f], grads_m + [dx_m]):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- SVFT

# banded d=10 on p=24: blocks of 16, padded to 32 (tests/test_methods.py runs d=2 on the toy model)
SVFT_CASES = [("plain", None, WIDE), ("banded", 10, TALL), ("random", 2, TALL), ("top_k", 2, SQUARE)]


@pytest.mark.parametrize("pattern,d,shape", SVFT_CASES)
def test_svft_matches_the_paper_equation(pattern, d, shape):
    kernel = kernel_of(shape)
    node = trained(kernel, "svft", pattern=pattern, d=d)
    rows, cols = svft.positions(node)
    expected = svft_reference(kernel, node.trainable["m"], rows, cols)
    assert rel_err(expected, np.asarray(kernel, np.float64)) > 1e-2  # the update moved it
    check_paths(node, expected)


def test_svft_pattern_positions():
    p, d = 32, 3
    kernel = kernel_of(SQUARE)
    band = p * (2 * d + 1) - d * (d + 1)
    assert band == len(band_reference(p, d)[0]) == 212

    plain = adapt(kernel, "svft")
    assert plain.trainable["m"].shape == (p,) and set(plain.frozen) == {"u", "v", "sigma0"}
    np.testing.assert_array_equal(svft.positions(plain), (np.arange(p), np.arange(p)))

    banded = adapt(kernel, "svft", pattern="banded", d=d)
    assert banded.trainable["m"].shape == (band,) and set(banded.frozen) == {"u", "v", "sigma0"}
    np.testing.assert_array_equal(svft.positions(banded), band_reference(p, d))  # row-major

    random = adapt(kernel, "svft", pattern="random", d=d)
    rows, cols = (np.asarray(random.frozen[k]) for k in ("rows", "cols"))
    assert random.frozen["rows"].dtype == jnp.int32 and random.trainable["m"].shape == (band,)
    flat = rows * p + cols
    assert len(np.unique(flat)) == band and np.all(np.diff(flat) > 0) and 0 <= flat.min() and flat.max() < p * p
    again, other = (adapt(kernel, "svft", key=k, pattern="random", d=d).frozen["rows"] for k in (1, 2))
    np.testing.assert_array_equal(again, rows)
    assert not np.array_equal(other, rows)  # the positions come from the key
    assert np.mean(np.abs(rows - cols) <= d) < 0.5  # not the band (a fifth of the cells)

    top = adapt(kernel, "svft", pattern="top_k", d=d)
    u, _, v = reference_svd(np.asarray(kernel, np.float64).T)
    scores = np.abs(u.T @ v)  # |u_iᵀ v_j|
    chosen = np.zeros((p, p), bool)
    chosen[np.asarray(top.frozen["rows"]), np.asarray(top.frozen["cols"])] = True
    assert chosen.sum() == band
    assert scores[chosen].min() > scores[~chosen].max()  # exactly the band-count largest


@pytest.mark.parametrize("hp,shape,message", [
    (dict(pattern="diagonal"), SQUARE,
     r"pattern must be one of \('plain', 'banded', 'random', 'top_k'\), got 'diagonal'"),
    (dict(pattern="banded"), SQUARE, r"the banded pattern needs d, a positive integer .*got d=None"),
    (dict(pattern="random", d=-1), SQUARE, r"d must be a positive integer, got -1"),
    (dict(pattern="top_k", d=0), SQUARE, r"d must be a positive integer, got 0"),
    (dict(d=2), SQUARE, r"the plain pattern trains the diagonal of M and takes no d, got d=2"),
    (dict(pattern="banded", d=24), WIDE,
     r"svft cannot adapt 'k': d=24 must be below p = min\(in, out\) = 24 of a \(24, 40\) kernel"),
    (dict(pattern="top_k", d=2), WIDE,
     r"svft cannot adapt 'k': the top_k pattern ranks \|u_i\^T v_j\| and needs a square kernel .*got \(24, 40\)"),
])
def test_svft_rejects_bad_inputs(hp, shape, message):
    with pytest.raises(ValueError, match=message):
        adapt(jax.ShapeDtypeStruct(shape, jnp.float32), "svft", **hp)


def test_svft_frozen_arrays_are_rebuilt_from_the_base():
    kernel = kernel_of(TALL, 2)
    config = svft.SvftConfig(pattern="random", d=2)
    trainable, frozen = svft.init(jax.random.key(0), kernel, config)
    rebuilt = svft.frozen_from_base(kernel, config)
    assert set(rebuilt) == {"u", "v", "sigma0"} and set(frozen) == set(rebuilt) | {"rows", "cols"}
    for k in rebuilt:
        np.testing.assert_array_equal(frozen[k], rebuilt[k])
    assert frozen["u"].shape == (24, 24) and frozen["v"].shape == (40, 24)
    v = np.asarray(frozen["v"])
    assert np.all(v[np.abs(v).argmax(axis=0), np.arange(24)] > 0)  # the fixed sign
    assert not np.any(trainable["m"])  # M = 0: W' = W
    _, bf16 = svft.init(jax.random.key(0), kernel.astype(jnp.bfloat16), config)
    assert {k: x.dtype for k, x in bf16.items()} == {"u": jnp.bfloat16, "v": jnp.bfloat16, "sigma0": jnp.bfloat16,
                                                      "rows": jnp.int32, "cols": jnp.int32}


@pytest.mark.parametrize("pattern,d", [("plain", None), ("random", 2)])
def test_svft_cost_model_counts_what_xla_compiles(pattern, d):
    """The mixes tests/test_methods.py does not run (it runs banded; top_k mixes as random), within 6 %."""
    from jpeft import bench

    n, tokens = 128, 256
    node = adapt(kernel_of((n, n)), "svft", pattern=pattern, d=d)
    trainable, frozen = jpeft.partition(node)
    x = jax.random.normal(jax.random.key(2), (tokens, n))
    for path, expected in zip(("factored", "materialized"), svft.flops(node, tokens)):
        step = jax.jit(jax.grad(lambda t, x: jnp.sum(jpeft.linear(x, jpeft.combine(t, frozen), path=path) ** 2),
                                argnums=(0, 1)))
        counted = 1e12 * bench.compiled_analysis(step.lower(trainable, x).compile())["xla_tflop_per_step"]
        assert abs(counted / expected - 1) < 0.06, (path, counted, expected)


# ---------------------------------------------------------------------------- LoRA-XS


@pytest.mark.parametrize("shape,r", [(WIDE, 5), (TALL, 24), (SQUARE, 16)])
def test_loraxs_matches_the_paper_equation(shape, r):
    kernel = kernel_of(shape, 3)
    node = trained(kernel, "loraxs", r=r)
    assert node.trainable["R"].shape == (r, r) and node.frozen["u"].shape == (shape[1], r)
    expected = loraxs_reference(kernel, node.trainable["R"])
    assert rel_err(expected, np.asarray(kernel, np.float64)) > 1e-2
    check_paths(node, expected)


def test_loraxs_starts_near_the_base_at_the_papers_scale():
    """R ~ N(0, 1e-5²) (the official code): ||K' - K||_F = ||diag(σ_r) R||_F, whose mean
    square is 1e-10 · r · Σ_{i<r} σ_i²."""
    r = 16
    kernel = kernel_of((64, 48), 4)
    node = adapt(kernel, "loraxs", r=r)
    big_r = np.asarray(node.trainable["R"], np.float64)
    assert 0.8e-5 < big_r.std() < 1.2e-5 and abs(big_r.mean()) < 3e-6  # 256 draws
    sigma = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[:r]
    moved = np.linalg.norm(np.asarray(jpeft.materialize({"k": node})["k"], np.float64) - np.asarray(kernel, np.float64))
    np.testing.assert_allclose(moved, np.linalg.norm(sigma[:, None] * big_r), rtol=2e-2)  # float32 rounding of K'
    expected = 1e-5 * np.sqrt(r * np.sum(sigma**2))
    assert 0.7 * expected < moved < 1.3 * expected
    assert 1e-6 < rel_err(jpeft.materialize({"k": node})["k"], kernel) < 1e-4


def test_loraxs_frozen_arrays_and_bad_rank():
    kernel = kernel_of(TALL, 5)
    config = loraxs.LoraxsConfig(r=6)
    _, frozen = loraxs.init(jax.random.key(0), kernel, config)
    assert frozen["kernel"] is kernel and frozen["u"].shape == (24, 6) and frozen["v"].shape == (40, 6)
    rebuilt = loraxs.frozen_from_base(kernel, config)
    for k in ("u", "v", "sigma0"):
        np.testing.assert_array_equal(frozen[k], rebuilt[k])
    np.testing.assert_allclose(frozen["sigma0"], np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[:6],
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"loraxs cannot adapt 'k': r=25 exceeds min\(in, out\) = 24 of a \(40, 24\)"):
        adapt(jax.ShapeDtypeStruct(TALL, jnp.float32), "loraxs", r=25)
    with pytest.raises(ValueError, match=r"r must be a positive integer, got 0"):
        adapt(jax.ShapeDtypeStruct(TALL, jnp.float32), "loraxs", r=0)


def test_loraxs_adapter_stores_r_and_the_singular_values(tmp_path):
    from jpeft import checkpoint
    from safetensors.numpy import load_file

    params = {"k": kernel_of(SQUARE, 6)}
    adapted = perturb(jpeft.apply(params, "loraxs", key=jax.random.key(1), targets="k", r=4), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    assert set(load_file(tmp_path / checkpoint.ADAPTER_WEIGHTS)) == {"k::trainable::R", "k::frozen::sigma0"}
    restored = checkpoint.load_adapter(tmp_path, params)
    assert restored["k"].frozen["kernel"] is params["k"]
    assert rel_err(jpeft.materialize(restored)["k"], jpeft.materialize(adapted)["k"]) < 1e-6


# -------------------------------------------------------------------- Phi-1.5 counts


@pytest.mark.parametrize("method,hp,count", [
    ("svft", {}, 72 * 2048),  # 147,456
    ("svft", dict(pattern="banded", d=16), 72 * (2048 * 33 - 16 * 17)),
    ("svft", dict(pattern="random", d=16), 72 * (2048 * 33 - 16 * 17)),
    ("svft", dict(pattern="top_k", d=16), 72 * (2048 * 33 - 16 * 17)),
    ("loraxs", {}, 72 * 16 * 16),  # 18,432
])
def test_phi_qkv_counts_from_shapes(method, hp, count):
    shapes = {"model": {f"layers_{i}": {"self_attn": {n: {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)}
                                                       for n in ("q_proj", "k_proj", "v_proj")}} for i in range(24)}}
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **hp), shapes)
    assert jpeft.count_params(abstract)["trainable"] == count
    assert count in (147_456, 4_846_464, 18_432)
