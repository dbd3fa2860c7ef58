"""jpeft.wrap on unmodified Flax models (linen, NNX, plain functions), N-D and stacked kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from conftest import METHODS, assert_close_to_scale, perturb, rel_err

HIDDEN, HEADS = 16, 2
# fits 16-wide layers (q/k/v and attention output matrices are 16 x 16 too)
WRAP_HPARAMS = {
    "lora": dict(r=4, alpha=8.0, dropout=0.0),
    "dora": dict(r=4, alpha=8.0, dropout=0.0),
    "lokr": dict(r=2, alpha=4.0),
    "oft": dict(block_size=4),
    "boft": dict(block_size=4, n_butterfly=2),
    "shoft": dict(r_u=3, r_v=2),
    "rhoft": dict(r_u=2, r_v=3, k=8),
    "hra": dict(r=3),
    "loha": dict(r=2, alpha=4.0),
    "ia3": dict(),
    "vera": dict(r=4),
    "dylora": dict(r=4, alpha=8.0),
    "adalora": dict(r=4, target_r=2, alpha=8.0, dropout=0.0),
    "mora": dict(r=2),
    "sbora": dict(r=2, alpha=4.0),
    "hoft": dict(r_u=3, r_v=2, scaled=True),
    "svft": dict(pattern="banded", d=1),
    "loraxs": dict(r=3),
}
assert set(METHODS) <= set(WRAP_HPARAMS)
# every case for two methods (one keeps the base kernel, one replaces it by an SVD); the
# others on the stacked and the multi-axis layouts, where a method's own arrays matter
ALL_CASES_FOR = ("lora", "shoft")
ATTENTION_LAYOUT = {r".*out/kernel": "iio", r".*/kernel": "ioo"}


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(HIDDEN)(nn.gelu(nn.Dense(2 * HIDDEN)(x)))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HIDDEN)(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(HIDDEN)(h)), None


class ScanStack(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
        return scanned()(x, None)[0]


def linen_case(module, layout=None):
    x = jax.random.normal(jax.random.key(1), (2, 5, HIDDEN))
    params = module.init(jax.random.key(0), x)["params"]
    return params, lambda p, x: module.apply({"params": p}, x), x, layout


def nnx_case(module, layout=None):
    graphdef, state = nnx.split(module)
    x = jax.random.normal(jax.random.key(1), (2, 5, HIDDEN))
    return state, lambda s, x: nnx.merge(graphdef, s)(x), x, layout


CASES = {
    "linen-dense": lambda: linen_case(Mlp()),
    "linen-attention": lambda: linen_case(Attention(), ATTENTION_LAYOUT),
    "linen-scan": lambda: linen_case(ScanStack(), "sio"),
    "nnx-linear": lambda: nnx_case(nnx.Linear(HIDDEN, HIDDEN, rngs=nnx.Rngs(0))),
    "nnx-lineargeneral": lambda: nnx_case(nnx.LinearGeneral(HIDDEN, (HEADS, HIDDEN // HEADS), rngs=nnx.Rngs(0)), "ioo"),
}


@pytest.mark.parametrize("method,case", [(m, c) for m in METHODS for c in CASES
                                         if m in ALL_CASES_FOR or c in ("linen-scan", "nnx-lineargeneral")])
def test_wrapped_equals_materialized(case, method):
    """Outputs and gradients of the wrapped call = those of the materialized tree
    (float32, <= 1e-5 relative), at init and after a random update of the trainables."""
    params, fn, x, layout = CASES[case]()
    adapted = jpeft.apply(params, method, key=jax.random.key(2), targets=r"(.*/)?kernel", layout=layout, **WRAP_HPARAMS[method])
    probe = jax.random.normal(jax.random.key(3), jax.eval_shape(fn, params, x).shape)

    def both(trainable, frozen, x):
        wrapped = lambda t: jnp.sum(jpeft.wrap(fn)(jpeft.combine(t, frozen), x) * probe)
        merged = lambda t: jnp.sum(fn(jpeft.materialize(jpeft.combine(t, frozen)), x) * probe)
        scale = jnp.sum(jnp.abs(fn(jpeft.materialize(jpeft.combine(trainable, frozen)), x) * probe))
        return jax.value_and_grad(wrapped)(trainable), jax.value_and_grad(merged)(trainable), scale

    step = jax.jit(both)
    for tree in (adapted, perturb(adapted, jax.random.key(4))):
        (out_w, grad_w), (out_m, grad_m), scale = step(*jpeft.partition(tree), x)
        assert_close_to_scale(out_w, out_m, 1e-5, scale)  # a sum that cancels: held to the size of its terms
        flat_w, flat_m = jax.tree_util.tree_leaves(grad_w), jax.tree_util.tree_leaves(grad_m)
        assert len(flat_w) == len(flat_m) > 0
        for gw, gm in zip(flat_w, flat_m):
            assert rel_err(gw, gm) <= 1e-5 or float(jnp.max(jnp.abs(gm))) < 1e-6  # exact zeros (BOFT's symmetric part)


def test_wrapped_outputs_match_at_the_right_place():
    """The wrapped outputs are not trivially equal: the perturbed adapter changes them."""
    params, fn, x, layout = CASES["linen-attention"]()
    adapted = jpeft.apply(params, "lora", key=jax.random.key(2), targets=r".*/kernel", layout=layout, r=4)
    base = fn(params, x)
    np.testing.assert_allclose(jpeft.wrap(fn)(adapted, x), base, rtol=1e-5, atol=1e-6)  # LoRA starts at W
    moved = jpeft.wrap(fn)(perturb(adapted, jax.random.key(5)), x)
    assert rel_err(moved, base) > 1e-2


# --- the factored path's cost -------------------------------------------------------

ROWS, WIDTH = 2048, 256


def _step_flops(loss, *args) -> float:
    compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("method", ["lora", "dora", "oft", "hra", "lokr", "boft", "rhoft"])
def test_wrapped_step_flops_follow_the_cost_model(method):
    """One 256 x 256 Dense layer on 2048 rows, gradients for the trainables and the input:
    XLA's FLOP count of the wrapped step is within the cost model's factored figure +5 %,
    and below the materialize-in-the-loss route, which pays the dense weight gradient."""
    hp = {"lora": dict(r=8), "dora": dict(r=8), "oft": dict(block_size=16), "hra": dict(r=8), "lokr": dict(r=4),
          "boft": dict(block_size=8, n_butterfly=2), "rhoft": dict(r_u=8, r_v=8, k=64)}[method]
    dense = nn.Dense(WIDTH, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (ROWS, WIDTH))
    params = dense.init(jax.random.key(1), x)["params"]
    adapted = jpeft.apply(params, method, key=jax.random.key(2), targets="kernel", **hp)
    trainable, frozen = jpeft.partition(adapted)
    wrapped = lambda t, f, x: jnp.sum(jpeft.wrap(dense.apply)({"params": jpeft.combine(t, f)}, x) ** 2)
    merged = lambda t, f, x: jnp.sum(dense.apply({"params": jpeft.materialize(jpeft.combine(t, f))}, x) ** 2)
    factored_model, materialized_model = jpeft.methods[method].flops(adapted["kernel"], ROWS)
    assert factored_model < materialized_model
    flops_wrapped, flops_merged = _step_flops(wrapped, trainable, frozen, x), _step_flops(merged, trainable, frozen, x)
    assert flops_wrapped <= 1.05 * factored_model, (flops_wrapped, factored_model)
    assert flops_wrapped < flops_merged, (flops_wrapped, flops_merged)


# --- dropout, stacked layers, control flow ------------------------------------------


def test_lora_dropout_under_wrap():
    params, fn, x, _ = CASES["linen-dense"]()
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(2), targets=r".*/kernel", r=4, dropout=0.5), jax.random.key(3))
    evaluation = fn(jpeft.materialize(adapted), x)
    np.testing.assert_allclose(jpeft.wrap(fn)(adapted, x), evaluation, rtol=1e-5, atol=1e-6)
    y1 = jpeft.wrap(fn, dropout_key=jax.random.key(7))(adapted, x)
    y2 = jpeft.wrap(fn, dropout_key=jax.random.key(8))(adapted, x)
    assert rel_err(y1, evaluation) > 1e-3 and rel_err(y1, y2) > 1e-3
    np.testing.assert_array_equal(y1, jpeft.wrap(fn, dropout_key=jax.random.key(7))(adapted, x))  # same key, same mask


def test_stacked_layers_share_the_frozen_base():
    """Each layer of an nn.scan stack gets its own adapter; the base stays the model's array."""
    params, fn, x, _ = CASES["linen-scan"]()
    kernel = params["ScanBlock_0"]["Dense_0"]["kernel"]
    adapted = jpeft.apply(params, "lora", key=jax.random.key(2), targets=r".*/kernel", layout="sio", r=4, alpha=8.0)
    node = adapted["ScanBlock_0"]["Dense_0"]["kernel"]
    assert node.frozen["kernel"] is kernel and node.stack_shape == (3,) and node.shape == (HIDDEN, HIDDEN)
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))
    assert nbytes(adapted) == nbytes(params) + nbytes(node.trainable)
    a = node.trainable["a"]
    assert a.shape == (3, HIDDEN, 4) and rel_err(a[0], a[1]) > 0.5  # one init per layer
    # each layer's update lands on its own layer
    moved = perturb(adapted, jax.random.key(3))
    merged = jpeft.materialize(moved)["ScanBlock_0"]["Dense_0"]["kernel"]
    t = moved["ScanBlock_0"]["Dense_0"]["kernel"].trainable
    for layer in range(3):
        expected = kernel[layer] + 2.0 * t["a"][layer] @ t["b"][layer]
        np.testing.assert_allclose(merged[layer], expected, rtol=1e-5, atol=1e-6)
    # no copy of the base per step: the wrapped scan's temporaries stay below one extra base
    compiled = jax.jit(jpeft.wrap(fn)).lower(moved, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * kernel.nbytes


def test_plain_functions_index_scan_remat_cond_and_vmap():
    """Plain JAX over dicts of arrays: a Python loop indexing a stack, fori_loop with a
    dynamic index, jax.checkpoint, lax.cond, and vmap around the wrapped function."""
    keys = jax.random.split(jax.random.key(0), 3)
    stack = jnp.stack([jax.random.normal(k, (8, 8)) / 3 for k in keys])
    params = {"stack": stack, "head": jax.random.normal(jax.random.key(9), (8, 4))}
    adapted = perturb(
        jpeft.apply(params, "hra", key=jax.random.key(1), targets=["stack", "head"], layout={"stack": "sio"}, r=2),
        jax.random.key(2),
    )
    merged = jpeft.materialize(adapted)
    x = jax.random.normal(jax.random.key(3), (5, 8))

    def fn(p, x):
        for i in range(2):
            x = jnp.tanh(x @ p["stack"][i])
        x = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["stack"][i]), x)
        x = jax.checkpoint(lambda h: h @ p["stack"][2])(x)
        x = jax.lax.cond(jnp.sum(x) > 0, lambda h: h @ p["head"], lambda h: -(h @ p["head"]), x)
        return x + jnp.sum(p["head"].T)  # a use that is not a product: materialized there

    np.testing.assert_allclose(jpeft.wrap(fn)(adapted, x), fn(merged, x), rtol=1e-5, atol=1e-6)
    batched = jax.vmap(jpeft.wrap(fn), in_axes=(None, 0))(adapted, x[None].repeat(2, 0))
    np.testing.assert_allclose(batched[1], fn(merged, x), rtol=1e-5, atol=1e-6)
    # indexing a layer slices the node: no materialized 3 x 8 x 8 stack in the program
    jaxpr = jax.make_jaxpr(lambda p, x: jpeft.wrap(lambda p, x: x @ p["stack"][1])(p, x))(adapted, x)
    assert not any(tuple(v.aval.shape) == (3, 8, 8) for e in jaxpr.jaxpr.eqns for v in e.outvars)


def test_linen_rngs_mutable_and_bf16_casts():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(HIDDEN, dtype=jnp.bfloat16)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dropout(0.5, deterministic=not train)(x)

    net = Net()
    x = jax.random.normal(jax.random.key(0), (4, HIDDEN))
    variables = net.init(jax.random.key(1), x, train=False)
    adapted = perturb(jpeft.apply(variables["params"], "lora", key=jax.random.key(2), targets=r".*/kernel", r=2), jax.random.key(3))
    run = lambda p, **kw: jpeft.wrap(net.apply)({"params": p, "batch_stats": variables["batch_stats"]}, x, **kw)
    merged = jpeft.materialize(adapted)
    reference = net.apply({"params": merged, "batch_stats": variables["batch_stats"]}, x, train=False)
    out = run(adapted, train=False)
    assert out.dtype == reference.dtype
    np.testing.assert_allclose(out.astype(jnp.float32), reference.astype(jnp.float32), rtol=2e-2, atol=2e-2)
    y, updates = run(adapted, train=True, rngs={"dropout": jax.random.key(4)}, mutable=["batch_stats"])
    y_ref, updates_ref = net.apply({"params": merged, "batch_stats": variables["batch_stats"]}, x, train=True,
                                   rngs={"dropout": jax.random.key(4)}, mutable=["batch_stats"])
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=2e-2, atol=2e-2)
    chex_like = jax.tree_util.tree_map(lambda a, b: rel_err(a, b) < 1e-2, updates, updates_ref)
    assert all(jax.tree_util.tree_leaves(chex_like))


# --- layouts, NNX state, extra trainable leaves -------------------------------------


def test_layout_errors_name_the_path_and_suggest():
    params, *_ = CASES["linen-attention"]()
    with pytest.raises(ValueError, match=r"key/kernel' has shape \(16, 2, 8\).*needs a layout.*'ioo'.*'iio'"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*/kernel", r=2)
    with pytest.raises(ValueError, match=r"layout 'io' does not fit .*query/kernel' of shape \(16, 2, 8\): it has 2 letters for 3 axes"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*query/kernel", layout="io", r=2)
    with pytest.raises(ValueError, match=r"layout 'ixo'.*only use the letters i, o and s"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*query/kernel", layout="ixo", r=2)
    with pytest.raises(ValueError, match=r"layout 'ios'.*stacked axes 's' must come first"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*query/kernel", layout="ios", r=2)
    with pytest.raises(ValueError, match=r"lora cannot adapt .*query/kernel' \(layout 'iio', one layer as an \(32, 8\) matrix\): r=9"):
        jpeft.apply(params, "lora", key=jax.random.key(0), targets=r".*query/kernel", layout="iio", r=9)


def test_nnx_state_through_the_whole_api():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(HIDDEN, 2 * HIDDEN, rngs=rngs)
            self.down = nnx.Linear(2 * HIDDEN, HIDDEN, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    # the same pattern as for linen params: NNX's trailing `value` does not count
    assert jpeft.match_targets(state, r".*/kernel") == ["down/kernel", "up/kernel"]
    adapted = jpeft.apply(state, "lora", key=jax.random.key(1), targets=r".*/kernel", also_train=r"down/bias", r=4)
    counts = jpeft.count_params(adapted)
    assert counts["trainable"] == 4 * (16 + 32) * 2 + HIDDEN
    assert counts["frozen"] == sum(x.size for x in jax.tree_util.tree_leaves(state)) - HIDDEN
    trainable, frozen = jpeft.partition(adapted)
    assert isinstance(trainable, nnx.State)
    moved = perturb(jpeft.combine(trainable, frozen), jax.random.key(2))
    merged = jpeft.materialize(moved)
    x = jnp.ones((3, HIDDEN))
    np.testing.assert_allclose(
        jpeft.wrap(lambda s, x: nnx.merge(graphdef, s)(x))(moved, x), nnx.merge(graphdef, merged)(x), rtol=1e-5, atol=1e-6
    )
    assert merged["down"]["bias"].dtype == state["down"]["bias"].dtype


def test_also_train_and_bitfit(params):
    adapted = jpeft.apply(params, "lora", key=jax.random.key(0), r=2, also_train=[r".*fc2/bias", r".*input_layernorm/scale"])
    node = adapted["model"]["layers_0"]["mlp"]["fc2"]["bias"]
    assert node.method == "full" and node.trainable["weight"].shape == (32,)
    trainable, _ = jpeft.partition(adapted)
    assert trainable["model"]["layers_1"]["input_layernorm"]["scale"].trainable["weight"].shape == (32,)
    lora_count = 6 * 2 * (32 + 32)
    assert jpeft.count_params(adapted)["trainable"] == lora_count + 2 * (32 + 32)
    with pytest.raises(ValueError, match=r"also_train matches leaves that are adaptation targets too"):
        jpeft.apply(params, "lora", key=jax.random.key(0), also_train=r".*q_proj/kernel")
    with pytest.raises(ValueError, match=r"target 'nope' matches no parameter"):
        jpeft.apply(params, "lora", key=jax.random.key(0), also_train="nope")

    bitfit = jpeft.apply(params, "bitfit", key=jax.random.key(0))
    counts = jpeft.count_params(bitfit)
    assert counts["trainable"] == 6 * 32 and set(counts["targets"]) == {
        f"model/layers_{i}/self_attn/{n}/bias" for i in range(2) for n in ("q_proj", "k_proj", "v_proj")
    }
    assert not jpeft.is_node(bitfit["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    no_bias = {"dense": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=r"no sibling 'bias': \['dense/kernel'\]"):
        jpeft.apply(no_bias, "bitfit", key=jax.random.key(0), targets=r".*kernel")


def test_phi_port_gives_the_same_numbers_under_wrap():
    """The Phi port consumes nodes itself (jpeft.linear); wrapped, the same product goes
    through the same jpeft.linear: one code path, equal logits."""
    from jpeft.models import phi

    model, params = phi.init(phi.config("tiny"), jax.random.key(0))
    adapted = perturb(jpeft.apply(params, "dora", key=jax.random.key(1), r=4), jax.random.key(2))
    ids = jax.random.randint(jax.random.key(3), (2, 8), 0, model.spec.vocab_size)
    direct = model.apply({"params": adapted}, ids)
    np.testing.assert_allclose(jpeft.wrap(model.apply)({"params": adapted}, ids), direct, rtol=1e-5, atol=1e-5)


def test_nnx_scan_over_a_vmapped_stack():
    """NNX's idiom for stacked layers (nnx.vmap to create, nnx.scan to run): each step
    receives one layer's node; the stacked base goes into the scan as it is."""

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return nnx.Linear(8, 8, rngs=rngs)

            self.layers = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def step(layer, h):
                return jnp.tanh(layer(h))

            return step(self.layers, x)

    graphdef, state = nnx.split(Stack(nnx.Rngs(0)))
    adapted = perturb(jpeft.apply(state, "lora", key=jax.random.key(1), targets=r".*/kernel", layout="sio", r=2), jax.random.key(2))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.random.normal(jax.random.key(3), (2, 8))
    np.testing.assert_allclose(jpeft.wrap(fn)(adapted, x), fn(jpeft.materialize(adapted), x), rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda a: jpeft.wrap(fn)(a, x))(adapted).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert any(v is jaxpr.invars[-1] for v in scan.invars)  # the (3, 8, 8) base, uncopied


@pytest.mark.parametrize("method", ["lora", "shoft"])  # with and without the base kernel among its arrays
def test_user_scan_and_vmap_over_an_adapted_stack(method):
    """A scan or vmap written by the user (outside wrap) slices a stacked node's arrays;
    the node's static description follows them."""
    stack = jax.random.normal(jax.random.key(0), (3, 8, 8)) / 3
    adapted = perturb(jpeft.apply({"w": stack}, method, key=jax.random.key(1), targets="w", layout="sio",
                                  **WRAP_HPARAMS[method]), jax.random.key(2))
    merged = jpeft.materialize(adapted)["w"]
    x = jax.random.normal(jax.random.key(3), (5, 8))
    layer = jpeft.wrap(lambda w, h: jnp.tanh(h @ w))
    y, _ = jax.lax.scan(lambda h, w: (layer(w, h), None), x, adapted["w"])
    y_ref, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, merged)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    per_layer = jax.vmap(jpeft.materialize)(adapted)["w"]
    np.testing.assert_allclose(per_layer, merged, rtol=1e-5, atol=1e-6)
