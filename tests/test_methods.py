"""Each method: starts at the original weights, stays orthogonal, factored == materialized."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import linalg
from jpeft.methods import boft, oft
from conftest import METHODS, NOT_IDENTITY_AT_INIT, SMALL_HPARAMS, decaying_matrix, perturb, rel_err

ALL_KERNELS = r".*/kernel"


def kernels(tree):
    return {p: x for p, x in jpeft.tree.leaves_with_paths(tree) if p.endswith("kernel")}


@pytest.fixture(scope="module")
def adapted(params):
    """Every method applied to every kernel of the toy model (Q/K/V, dense, fc1, fc2)."""
    return {m: jpeft.apply(params, m, key=jax.random.key(1), targets=ALL_KERNELS, **SMALL_HPARAMS[m]) for m in METHODS}


@pytest.mark.parametrize("method", [m for m in METHODS if m not in NOT_IDENTITY_AT_INIT])
def test_init_reproduces_params(params, adapted, method):
    merged = kernels(jpeft.materialize(adapted[method]))
    for path, kernel in kernels(params).items():
        assert rel_err(merged[path], kernel) <= 1e-6, path


def test_rhoft_starts_at_near_optimal_rank_k_approximation():
    k = 12
    kernel = decaying_matrix(jax.random.key(2), (48, 40), decay=0.85)
    tree = {"q_proj": {"kernel": kernel}}
    adapted = jpeft.apply(tree, "rhoft", key=jax.random.key(3), targets="q_proj/kernel", k=k, r_u=4, r_v=4)
    node = adapted["q_proj"]["kernel"]
    assert node.frozen["u"].shape == (40, k) and node.frozen["v"].shape == (48, k)
    assert "kernel" not in node.frozen  # the original matrix is dropped
    err = np.linalg.norm(jpeft.materialize(adapted)["q_proj"]["kernel"] - kernel)
    sv = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(sv[k:] ** 2))
    assert optimal * (1 - 1e-5) <= err <= 1.5 * optimal


def test_rhoft_default_k_is_memory_neutral():
    tree = {"q_proj": {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}}
    shapes = jax.eval_shape(lambda t: jpeft.apply(t, "rhoft", key=jax.random.key(0), targets="q_proj/kernel"), tree)
    node = shapes["q_proj"]["kernel"]
    assert node.frozen["u"].shape == (2048, 1024)
    assert sum(x.size for x in node.frozen.values()) == 2048 * 2048


def test_orthogonal_factors_stay_orthogonal_after_updates(params, adapted):
    key = jax.random.key(4)
    eye = lambda d: np.eye(d)
    node = perturb(adapted["oft"], key, 0.5)["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    r = oft.rotation_blocks(node)
    np.testing.assert_allclose(r @ jnp.swapaxes(r, -1, -2), np.broadcast_to(eye(8), r.shape), atol=1e-5)

    node = perturb(adapted["boft"], key, 0.5)["model"]["layers_0"]["mlp"]["fc2"]["kernel"]
    b = boft.rotate_inputs(jnp.eye(node.shape[0]), node)
    np.testing.assert_allclose(b @ b.T, eye(node.shape[0]), atol=1e-5)

    for method in ("shoft", "rhoft"):
        node = perturb(adapted[method], key, 0.5)["model"]["layers_0"]["mlp"]["fc1"]["kernel"]
        for name in ("w_u", "w_v"):
            h = linalg.householder_product(node.trainable[name])
            np.testing.assert_allclose(h @ h.T, eye(h.shape[0]), atol=1e-5)
        np.testing.assert_allclose(node.frozen["v"].T @ node.frozen["v"], eye(node.frozen["v"].shape[1]), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_factored_and_materialized_paths_agree(adapted, method):
    tree = perturb(adapted[method], jax.random.key(5), 0.2)
    node = tree["model"]["layers_1"]["mlp"]["fc1"]["kernel"]  # non-square 32 -> 64
    trainable, frozen = jpeft.partition(node)
    x = jax.random.normal(jax.random.key(6), (3, 5, node.shape[0]))

    def loss(trainable, x, path):
        y = jpeft.linear(x, jpeft.combine(trainable, frozen), path=path)
        return jnp.sum(jnp.sin(y)), y

    (lf, yf), gf = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(trainable, x, "factored")
    (lm, ym), gm = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(trainable, x, "materialized")
    np.testing.assert_allclose(yf, ym, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gm)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(gf[0]))


@pytest.mark.parametrize("method", METHODS)
def test_auto_path_follows_cost_model(adapted, method):
    node = adapted[method]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    factored_cost, materialized_cost = jpeft.methods[method].flops(node, 4096)
    assert factored_cost > 0 and materialized_cost > 0
    x = jax.random.normal(jax.random.key(7), (4, node.shape[0]))
    np.testing.assert_allclose(jpeft.linear(x, node), jpeft.linear(x, node, path="factored"), atol=2e-5)


def test_lora_dropout_only_in_training():
    tree = {"q_proj": {"kernel": jax.random.normal(jax.random.key(8), (16, 16))}}
    adapted = perturb(jpeft.apply(tree, "lora", key=jax.random.key(9), targets="q_proj/kernel", r=4, dropout=0.5), jax.random.key(1))
    node = adapted["q_proj"]["kernel"]
    x = jnp.ones((64, 16))
    y_eval = jpeft.linear(x, node)
    y_train = jpeft.linear(x, node, dropout_key=jax.random.key(2))
    np.testing.assert_allclose(y_eval, jpeft.linear(x, node, path="materialized"), atol=1e-5)
    assert float(jnp.abs(y_train - y_eval).max()) > 1e-3
    # Dropout touches only the adapter input: same mask, computed by hand.
    keep = jax.random.bernoulli(jax.random.key(2), 0.5, x.shape)
    t = node.trainable
    expected = x @ node.frozen["kernel"] + node.config.scale * ((jnp.where(keep, x / 0.5, 0) @ t["a"]) @ t["b"])
    np.testing.assert_allclose(y_train, expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="path must be one of"):
        jpeft.linear(x, node, path="fast")


def test_training_keys_draw_independent_bernoulli_masks():
    """The train step's keys (jpeft.counter_rng): each mask keeps a fraction within 4 standard
    errors of its rate, and masks from folded-in keys (two layers, two steps) are uncorrelated."""
    from jpeft import counter_rng

    key, n, keep = counter_rng.key(3), 200_000, 0.95
    masks = [jax.random.bernoulli(jax.random.fold_in(key, i), keep, (n,)) for i in range(4)]
    masks.append(jax.random.bernoulli(jax.random.split(key)[1], keep, (n,)))
    se = np.sqrt(keep * (1 - keep) / n)
    for m in masks:
        assert abs(float(m.mean()) - keep) < 4 * se
    m = np.array(masks, np.float64)
    corr = np.corrcoef(m)[np.triu_indices(len(masks), 1)]
    assert np.abs(corr).max() < 4 / np.sqrt(n)
    bits = np.asarray(jax.random.bits(key, (n,), jnp.uint32))
    assert np.unique(bits).size > 0.99 * n  # a counter hash: no short cycles
    # the key data has threefry's shape: a checkpointed TrainState.rng reads the same
    assert jax.random.key_data(key).shape == jax.random.key_data(jax.random.key(3)).shape == (2,)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512)])
def test_non_square_phi_mlp_shapes(method, shape):
    """Phi's MLP aspect (1:4 and 4:1) at a quarter of its width, with each method's defaults."""
    kernel = jax.random.normal(jax.random.key(10), shape, jnp.float32) / np.sqrt(shape[0])
    tree = {"fc": {"kernel": kernel}}
    hparams = {"oft": dict(block_size=64), "boft": dict(block_size=8, n_butterfly=2), "rhoft": dict(k=256)}.get(method, {})
    adapted = jpeft.apply(tree, method, key=jax.random.key(11), targets="fc/kernel", **hparams)
    node = perturb(adapted, jax.random.key(12), 0.01)["fc"]["kernel"]
    x = jax.random.normal(jax.random.key(13), (2, shape[0]))
    y = jpeft.linear(x, node, path="factored")
    assert y.shape == (2, shape[1]) and bool(jnp.all(jnp.isfinite(y)))
    merged = jpeft.materialize({"fc": {"kernel": node}})["fc"]["kernel"]
    assert merged.shape == shape
    np.testing.assert_allclose(y, x @ merged, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_weights(params, method):
    """Frozen arrays keep the kernel's bf16, trainables are float32, outputs follow x's dtype."""
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    adapted = jpeft.apply(bf16, method, key=jax.random.key(14), **SMALL_HPARAMS[method])
    node = adapted["model"]["layers_0"]["self_attn"]["v_proj"]["kernel"]
    assert all(x.dtype == jnp.float32 for x in node.trainable.values())
    assert all(x.dtype == jnp.bfloat16 for x in node.frozen.values() if jnp.issubdtype(x.dtype, jnp.floating))
    x = jax.random.normal(jax.random.key(15), (4, 32), jnp.bfloat16)
    y = jpeft.linear(x, node)
    assert y.dtype == jnp.bfloat16
    assert jpeft.materialize(adapted)["model"]["layers_0"]["self_attn"]["v_proj"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("method", METHODS)
def test_cost_model_counts_what_xla_compiles(method):
    """``Method.flops`` (which picks the path) matches XLA's FLOP count of the compiled
    training step of one layer (forward, gradients of the trainables and of ``x``)
    within 6 %, on both paths: the factored path really skips the weight gradient."""
    from jpeft import bench

    n, tokens = 128, 256
    kernel = jax.random.normal(jax.random.key(0), (n, n)) / np.sqrt(n)
    hparams = {**SMALL_HPARAMS[method], **({"k": 64} if method == "rhoft" else {})}
    node = jpeft.apply({"q_proj": {"kernel": kernel}}, method, key=jax.random.key(1), targets="q_proj/kernel",
                       **hparams)["q_proj"]["kernel"]
    trainable, frozen = jpeft.partition(node)
    x = jax.random.normal(jax.random.key(2), (tokens, n))
    predicted = dict(zip(("factored", "materialized"), jpeft.methods[method].flops(node, tokens)))
    for path, expected in predicted.items():
        def step(t, x, path=path):
            return jnp.sum(jpeft.linear(x, jpeft.combine(t, frozen), path=path) ** 2)

        compiled = jax.jit(jax.grad(step, argnums=(0, 1))).lower(trainable, x).compile()
        counted = 1e12 * bench.compiled_analysis(compiled)["xla_tflop_per_step"]
        assert abs(counted / expected - 1) < 0.06, (path, counted, expected)
