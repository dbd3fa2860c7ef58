"""Shared fixtures: small model-shaped parameter trees and per-method hyper-parameters."""

import atexit
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

# XLA's persistent compilation cache, one directory per test process: the runs that build the
# same train step again (stop and resume, repeated fits) load it instead of compiling it again.
_XLA_CACHE = tempfile.mkdtemp(prefix="jpeft-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Hyper-parameters that fit the 32-wide toy model below, one entry per built-in method.
SMALL_HPARAMS = {
    "lora": dict(r=4, alpha=8.0, dropout=0.0),
    "dora": dict(r=4, alpha=8.0, dropout=0.0),
    "lokr": dict(r=2, alpha=4.0),
    "oft": dict(block_size=8),
    "boft": dict(block_size=4, n_butterfly=2),
    "shoft": dict(r_u=3, r_v=4),
    "rhoft": dict(r_u=4, r_v=3, k=16),
    "hra": dict(r=5),  # odd: ends with a zero (identity) reflection
    "loha": dict(r=4, alpha=8.0),
    "ia3": dict(),
    "vera": dict(r=8, d_init=0.1),
    "dylora": dict(r=4, alpha=8.0),
    "adalora": dict(r=4, target_r=2, alpha=8.0, dropout=0.0),
    "mora": dict(r=4),  # r̂ 16 on 32x32, 19 (odd, padded, repeated/truncated) on fc1/fc2
    "sbora": dict(r=4, alpha=8.0),
    "hoft": dict(r_u=3, r_v=4, scaled=True),
    "svft": dict(pattern="banded", d=2),  # p = 32 on every kernel: 154 entries, 4 blocks of 8
    "loraxs": dict(r=4),
}
METHODS = list(SMALL_HPARAMS)
# methods whose paper does not start at the original weights (each pins its own bound elsewhere)
NOT_IDENTITY_AT_INIT = {"rhoft", "loraxs"}


def decaying_matrix(key, shape, decay=0.9, dtype=jnp.float32):
    """A random matrix with singular values ``decay**i`` (a slowly decaying spectrum)."""
    m, n = shape
    p = min(shape)
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, p)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, p)))
    return ((u * decay ** jnp.arange(p)) @ v.T).astype(dtype)


def toy_params(key, hidden=32, mlp=64, layers=2):
    """A parameter tree shaped like the Phi port (kernels (in, out) with biases)."""
    tree = {}
    for i in range(layers):
        shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden), "dense": (hidden, hidden)}
        attn = {}
        for j, (name, shape) in enumerate(shapes.items()):
            k = jax.random.fold_in(key, 10 * i + j)
            attn[name] = {"kernel": jax.random.normal(k, shape) / np.sqrt(shape[0]), "bias": jnp.zeros(shape[1])}
        kf = jax.random.fold_in(key, 10 * i + 9)
        tree[f"layers_{i}"] = {
            "input_layernorm": {"scale": jnp.ones(hidden), "bias": jnp.zeros(hidden)},
            "self_attn": attn,
            "mlp": {
                "fc1": {"kernel": jax.random.normal(kf, (hidden, mlp)) / np.sqrt(hidden), "bias": jnp.zeros(mlp)},
                "fc2": {"kernel": jax.random.normal(kf, (mlp, hidden)) / np.sqrt(mlp), "bias": jnp.zeros(hidden)},
            },
        }
    return {"model": tree}


@pytest.fixture(scope="session")
def params():
    return toy_params(jax.random.key(0))


def perturb(adapted, key, scale=0.1):
    """Random non-zero update of every trainable array (so tests leave the identity)."""
    trainable, frozen = jpeft.partition(adapted)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jpeft.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


def rel_err(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a) - jnp.asarray(b)) / jnp.linalg.norm(jnp.asarray(b)))


def assert_close_to_scale(actual, expected, rtol, scale=None):
    """``max |actual - expected| <= rtol * scale``, the scale defaulting to ``max |expected|``.

    float32 rounding is relative to the magnitudes summed, not to each result: an element
    near zero (or a sum that cancels) carries the error of the array's scale, so it is held
    to that scale, not to its own size (which machines' different summation orders break).
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected))) if scale is None else float(scale)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x scale {scale:.3g}"
