"""The functional API: targets, partition/combine, counts, registry, transformations, errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from conftest import perturb


def qkv_paths(tree):
    return [p for p, leaf in jpeft.tree.leaves_with_paths(tree) if jpeft.is_node(leaf)]


def test_default_targets_are_qkv(params):
    adapted = jpeft.apply(params, "lora", key=jax.random.key(0), r=2)
    assert sorted(qkv_paths(adapted)) == sorted(
        f"model/layers_{i}/self_attn/{n}/kernel" for i in range(2) for n in ("q_proj", "k_proj", "v_proj")
    )
    assert jax.tree_util.tree_structure(jpeft.materialize(adapted)) == jax.tree_util.tree_structure(params)
    # untouched leaves are the very same arrays
    assert adapted["model"]["layers_0"]["mlp"]["fc1"]["kernel"] is params["model"]["layers_0"]["mlp"]["fc1"]["kernel"]


def test_list_of_targets_and_keys(params):
    adapted = jpeft.apply(params, "lora", key=jax.random.key(0), targets=[r".*/fc1/kernel", r".*layers_1/.*/dense/kernel"], r=2)
    assert sorted(qkv_paths(adapted)) == ["model/layers_0/mlp/fc1/kernel", "model/layers_1/mlp/fc1/kernel", "model/layers_1/self_attn/dense/kernel"]
    # same key, same result; different targets get different draws
    again = jpeft.apply(params, "lora", key=jax.random.key(0), targets=[r".*/fc1/kernel", r".*layers_1/.*/dense/kernel"], r=2)
    a0 = adapted["model"]["layers_0"]["mlp"]["fc1"]["kernel"].trainable["a"]
    np.testing.assert_array_equal(a0, again["model"]["layers_0"]["mlp"]["fc1"]["kernel"].trainable["a"])
    assert not np.allclose(a0, adapted["model"]["layers_1"]["mlp"]["fc1"]["kernel"].trainable["a"])


def test_partition_combine_and_grad_only_trainables(params):
    adapted = perturb(jpeft.apply(params, "dora", key=jax.random.key(1), r=2), jax.random.key(2))
    trainable, frozen = jpeft.partition(adapted)
    rebuilt = jpeft.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(adapted)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(adapted)))
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    assert n_trainable == jpeft.count_params(adapted)["trainable"]
    assert sum(x.size for x in jax.tree_util.tree_leaves(frozen)) == jpeft.count_params(adapted)["frozen"]

    x = jax.random.normal(jax.random.key(3), (4, 32))

    def loss(trainable, frozen, x):
        p = jpeft.combine(trainable, frozen)
        h = x
        for name in ("q_proj", "k_proj", "v_proj"):
            h = jpeft.linear(h, p["model"]["layers_0"]["self_attn"][name]["kernel"])
        return jnp.mean(h**2)

    grads = jax.jit(jax.grad(loss))(trainable, frozen, x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    opt = optax.adamw(1e-2)
    state = opt.init(trainable)
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * n_trainable + 1  # mu, nu, count
    updates, state = opt.update(grads, state, trainable)
    new = optax.apply_updates(trainable, updates)
    assert loss(new, frozen, x) < loss(trainable, frozen, x)


def test_vmap_over_keys_and_jit_materialize(params):
    keys = jax.random.split(jax.random.key(4), 3)
    stacked = jax.vmap(lambda k: jpeft.apply(params, "shoft", key=k, r_u=2, r_v=2))(keys)
    w = stacked["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].trainable["w_u"]
    assert w.shape == (3, 32, 2)
    merged = jax.jit(jax.vmap(jpeft.materialize))(stacked)
    q = merged["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(q, np.broadcast_to(params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], q.shape), atol=1e-5)


def test_count_params_rows_and_eval_shape(params):
    adapted = jpeft.apply(params, "lora", key=jax.random.key(5), r=4)
    counts = jpeft.count_params(adapted)
    assert counts["trainable"] == 6 * 4 * (32 + 32)
    total_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert counts["frozen"] == total_params
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    row = counts["targets"]["model/layers_0/self_attn/q_proj/kernel"]
    assert row == {"method": "lora", "shape": (32, 32), "layout": "io", "trainable": 256, "frozen": 1024}
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract = jax.eval_shape(lambda p: jpeft.apply(p, "lora", key=jax.random.key(5), r=4), shapes)
    assert jpeft.count_params(abstract) == counts


def test_register_user_method(params):
    @dataclasses.dataclass(frozen=True)
    class ScaleConfig:
        def check(self, shape):
            pass

    def init(key, kernel, config):
        return {"s": jnp.ones(kernel.shape[1])}, {"kernel": kernel}

    method = jpeft.Method(
        ScaleConfig,
        init,
        materialize=lambda n: n.frozen["kernel"] * n.trainable["s"],
        factored=lambda x, n, key: (x @ n.frozen["kernel"]) * n.trainable["s"],
        flops=lambda n, t: (1.0, 2.0),
    )
    jpeft.register("column_scale", method)
    try:
        adapted = jpeft.apply(params, "column_scale", key=jax.random.key(0))
        assert jpeft.count_params(adapted)["trainable"] == 6 * 32
        with pytest.raises(ValueError, match="already registered"):
            jpeft.register("column_scale", method)
        with pytest.raises(TypeError, match="expects a jpeft.Method"):
            jpeft.register("bad", object())
    finally:
        jpeft.methods.pop("column_scale")


# ----------------------------------------------------------------------- bad input


def test_unknown_method_lists_known(params):
    with pytest.raises(ValueError, match=r"unknown method .lorax.*" + ", ".join(sorted(jpeft.methods))):
        jpeft.apply(params, "lorax", key=jax.random.key(0))


def test_target_that_matches_nothing_lists_paths(params):
    with pytest.raises(ValueError, match=r"target 'query/kernel' matches no parameter.*model/layers_0/self_attn/q_proj/kernel"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=["q_proj", "query/kernel"][1:])
    with pytest.raises(ValueError, match="not a valid regex"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets="(")


def test_adapting_an_adapted_kernel_says_so(params):
    adapted = jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*/q_proj/kernel", r=2)
    with pytest.raises(ValueError, match=r"already adapted: \['model/layers_0/self_attn/q_proj/kernel \(lora\)'.*materialize"):
        jpeft.apply(adapted, "oft", key=jax.random.key(1), targets=r".*/(q|k)_proj/kernel", block_size=8)
    both = jpeft.apply(adapted, "oft", key=jax.random.key(1), targets=r".*/k_proj/kernel", block_size=8)  # others: fine
    assert jpeft.count_params(both)["targets"]["model/layers_1/self_attn/k_proj/kernel"]["method"] == "oft"


def test_combine_names_the_first_mismatch(params):
    lora = jpeft.apply(params, "lora", key=jax.random.key(0), r=2)
    trainable, frozen = jpeft.partition(lora)
    _, other_frozen = jpeft.partition(jpeft.apply(params, "lora", key=jax.random.key(0), r=4))
    with pytest.raises(ValueError, match=r"differ at 'model/layers_0/self_attn/k_proj/kernel': a lora node .*r=2.* in trainable, "
                                         r"a lora node .*r=4.* in frozen; combine takes the two halves"):
        jpeft.combine(trainable, other_frozen)
    with pytest.raises(ValueError, match=r"differ at 'model/layers_0/self_attn/k_proj/kernel': a lora node .* in trainable, "
                                         r"an array of shape \(32, 32\) in frozen"):
        jpeft.combine(trainable, params)
    missing = {"model": {k: v for k, v in frozen["model"].items() if k != "layers_1"}}
    with pytest.raises(ValueError, match=r"at 'model/layers_1/input_layernorm/bias', which only trainable has"):
        jpeft.combine(trainable, missing)
    with pytest.raises(ValueError, match=r"both trees have an array at 'model/layers_0/input_layernorm/bias'"):
        jpeft.combine(frozen, frozen)
    with pytest.raises(ValueError, match=r"neither tree has an array at 'model/layers_0/input_layernorm/bias'"):
        jpeft.combine(trainable, trainable)


def test_numpy_scalars_are_hyper_parameters(params):
    plain = jpeft.apply(params, "lora", key=jax.random.key(0), r=4, alpha=16.0, dropout=0.0)
    numpy = jpeft.apply(params, "lora", key=jax.random.key(0), r=np.int64(4), alpha=np.float32(16), dropout=np.float64(0))
    node = numpy["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert node.config == plain["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].config
    assert type(node.config.r) is int and type(node.config.alpha) is float
    chex.assert_trees_all_equal(numpy, plain)


def test_non_2d_and_integer_targets(params):
    with pytest.raises(ValueError, match=r"target 'model/layers_0/self_attn/q_proj/bias' has shape \(32,\)"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*layers_0/self_attn/q_proj/bias")
    ints = {"q_proj": {"kernel": jnp.ones((8, 8), jnp.int32)}}
    with pytest.raises(TypeError, match=r"'q_proj/kernel' has dtype int32"):
        jpeft.apply(ints, "lora", key=jax.random.key(0), r=2)


@pytest.mark.parametrize(
    "method,hparams,message",
    [
        ("lora", dict(r=64), r"lora cannot adapt 'model/layers_0/self_attn/k_proj/kernel': r=64 exceeds min\(in, out\) = 32"),
        ("dora", dict(r=33), r"r=33 exceeds"),
        ("lokr", dict(r=40), r"r=40 exceeds"),
        ("shoft", dict(r_u=33), r"r_u=33 exceeds the output dimension 32"),
        ("rhoft", dict(r_v=99), r"r_v=99 exceeds the input dimension 32"),
        ("oft", dict(block_size=5), r"block_size=5 does not divide the rotated dimension 32"),
        ("boft", dict(block_size=6), r"block_size=6 does not divide the input dimension 32"),
        ("boft", dict(block_size=8, n_butterfly=4), r"multiple of block_size \* 2\*\*\(n_butterfly - 1\) = 64"),
        ("rhoft", dict(k=33), r"k=33 is out of range: it must be in \[1, min\(in, out\) = 32\]"),
    ],
)
def test_hparams_that_do_not_fit_the_kernel(params, method, hparams, message):
    with pytest.raises(ValueError, match=message):
        jpeft.apply(params, method, key=jax.random.key(0), **hparams)


@pytest.mark.parametrize(
    "method,hparams,message",
    [
        ("lora", dict(r=0), "r must be a positive integer, got 0"),
        ("lora", dict(r=2.5), "r must be a positive integer, got 2.5"),
        ("lora", dict(alpha=-1.0), "alpha must be a positive number, got -1.0"),
        ("dora", dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        ("lora", dict(init="zeros"), "init must be one of"),
        ("lokr", dict(factor=0), "factor must be -1 or a positive integer, got 0"),
        ("oft", dict(block_size=-4), "block_size must be a positive integer, got -4"),
        ("oft", dict(side="left"), "side must be one of"),
        ("oft", dict(neumann_terms=0), "neumann_terms must be a positive integer, got 0"),
        ("boft", dict(n_butterfly=0), "n_butterfly must be a positive integer, got 0"),
        ("shoft", dict(r_v=-1), "r_v must be a positive integer, got -1"),
        ("rhoft", dict(k=0), "k must be a positive integer, got 0"),
        ("rhoft", dict(power_iters=-1), "power_iters must be a non-negative integer, got -1"),
    ],
)
def test_non_positive_hparams(params, method, hparams, message):
    with pytest.raises(ValueError, match=message):
        jpeft.apply(params, method, key=jax.random.key(0), **hparams)


def test_unknown_hparam_is_a_type_error(params):
    with pytest.raises(TypeError, match=r"method 'lora' got unknown hyper-parameter\(s\) \['rank'\]; valid: \['r', 'alpha', 'dropout', 'init', 'rslora'\]"):
        jpeft.apply(params, "lora", key=jax.random.key(0), rank=4)


def test_phi_qkv_parameter_counts_without_allocation():
    """Counts for Phi-1.5's 72 Q/K/V matrices (HF PEFT 0.21 prints the same counts), from shapes only."""
    shapes = {
        "model": {
            f"layers_{i}": {"self_attn": {n: {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)} for n in ("q_proj", "k_proj", "v_proj")}}
            for i in range(24)
        }
    }
    expected = {
        ("lora", ()): 4_718_592,
        ("dora", ()): 4_866_048,
        ("oft", (("block_size", 64),)): 4_644_864,
        ("shoft", ()): 4_866_048,
        ("rhoft", (("k", 1024),)): 4_792_320,
        # the seeds' other methods at their defaults (VeRA's is the count PEFT prints)
        ("svft", ()): 147_456,
        ("vera", ()): 165_888,
        ("loraxs", ()): 18_432,
        ("mora", ()): 4_718_592,
        ("sbora", ()): 2_359_296,
        ("loha", ()): 9_437_184,
        ("ia3", ()): 147_456,
        ("lora", (("init", "pissa"),)): 4_718_592,
        ("dylora", ()): 4_718_592,
        ("hoft", ()): 4_718_592,
        ("adalora", ()): 72 * (12 * 2048 + 12 + 2048 * 12),
    }
    for (method, hp), count in expected.items():
        abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **dict(hp)), shapes)
        assert jpeft.count_params(abstract)["trainable"] == count, method


def test_bitfit_phi_count_without_allocation():
    """BitFit on Phi-1.5's Q/K/V: the 72 biases of 2048, nothing else (from shapes only)."""
    from jpeft.models import phi

    shapes = phi.param_shapes(phi.make_model(phi.config("phi-1.5")))
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, "bitfit", key=jax.random.key(0)), shapes)
    counts = jpeft.count_params(abstract)
    assert counts["trainable"] == 24 * 3 * 2048 == 147_456
    assert counts["total"] == 1_418_270_720
