"""VeRA (shared random projections, PEFT parity) and DyLoRA (a random training rank per
step, evaluation at any rank up to r) against float64 references of the papers' equations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint
from jpeft.methods import dylora
from conftest import perturb

ALL_KERNELS = r".*/kernel"
f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731


def node_at(tree, *path):
    for p in path:
        tree = tree[p]
    return tree


# --------------------------------------------------------------------------- VeRA


@pytest.fixture(scope="module")
def vera_tree(params):
    """VeRA r=8 on every kernel of the toy model: q/k/v/dense 32x32, fc1 32x64, fc2 64x32."""
    return jpeft.apply(params, "vera", key=jax.random.key(1), targets=ALL_KERNELS, r=8)


@pytest.fixture(scope="module")
def vera_moved(vera_tree):
    return perturb(vera_tree, jax.random.key(3), 0.3)


def test_vera_projections_are_drawn_once_and_shared_by_size(vera_tree, params):
    layer = lambda i, *p: node_at(vera_tree, "model", f"layers_{i}", *p, "kernel")  # noqa: E731
    q, k, fc1, fc2 = layer(0, "self_attn", "q_proj"), layer(0, "self_attn", "k_proj"), layer(0, "mlp", "fc1"), layer(0, "mlp", "fc2")
    # one object per distinct size, whatever the target or layer
    assert q.frozen["a"] is k.frozen["a"] is fc1.frozen["a"] is layer(1, "self_attn", "v_proj").frozen["a"]
    assert q.frozen["b"] is k.frozen["b"] is fc2.frozen["b"] is layer(1, "self_attn", "dense").frozen["b"]
    assert q.frozen["kernel"] is params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    # one draw, sliced: the 64-wide projections extend the 32-wide ones
    assert fc2.frozen["a"].shape == (64, 8) and fc1.frozen["b"].shape == (8, 64)
    np.testing.assert_array_equal(fc2.frozen["a"][:32], q.frozen["a"])
    np.testing.assert_array_equal(fc1.frozen["b"][:, :32], q.frozen["b"])
    # PEFT's kaiming_uniform with gain sqrt(2): U(+-sqrt(6/fan_in)), fan_in = max in (A), r (B)
    for x, bound in ((fc2.frozen["a"], np.sqrt(6 / 64)), (fc1.frozen["b"], np.sqrt(6 / 8))):
        assert 0.9 * bound < float(jnp.abs(x).max()) <= bound
        assert abs(float(jnp.std(x)) - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)
    np.testing.assert_array_equal(q.trainable["lambda_d"], np.full(8, 0.1, np.float32))
    np.testing.assert_array_equal(q.trainable["lambda_b"], np.zeros(32, np.float32))
    # the draw is a function of the apply key
    again = jpeft.apply(params, "vera", key=jax.random.key(1), targets=ALL_KERNELS, r=8)
    other = jpeft.apply(params, "vera", key=jax.random.key(2), targets=ALL_KERNELS, r=8)
    pick = lambda t: node_at(t, "model", "layers_0", "mlp", "fc2", "kernel").frozen["a"]  # noqa: E731
    np.testing.assert_array_equal(pick(again), fc2.frozen["a"])
    assert float(jnp.abs(pick(other) - fc2.frozen["a"]).max()) > 0.1


def test_vera_matches_its_equation_in_float64(vera_moved):
    """``W' = W + Λ_b B Λ_d A`` in the paper's (out x in) orientation, outputs and the
    gradients of both vectors, against numpy float64."""
    node = node_at(vera_moved, "model", "layers_1", "mlp", "fc1", "kernel")
    a_paper, b_paper = f64(node.frozen["a"]).T, f64(node.frozen["b"]).T  # A (r x in), B (out x r)
    d, lam_b = f64(node.trainable["lambda_d"]), f64(node.trainable["lambda_b"])
    w = f64(node.frozen["kernel"]).T + np.diag(lam_b) @ b_paper @ np.diag(d) @ a_paper
    x = np.random.RandomState(0).randn(7, 32)
    g = np.random.RandomState(1).randn(7, 64)  # loss = sum(g * y)
    np.testing.assert_allclose(jpeft.materialize({"k": node})["k"], w.T, rtol=1e-5, atol=1e-6)
    trainable, frozen = jpeft.partition(node)
    x32, g32 = jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)
    for path in ("factored", "materialized"):
        y = jpeft.linear(x32, node, path=path)
        grads = jax.grad(lambda t: jnp.sum(g32 * jpeft.linear(x32, jpeft.combine(t, frozen), path=path)))(trainable).trainable
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
        xa = x @ a_paper.T  # (T, r)
        np.testing.assert_allclose(grads["lambda_b"], np.sum(g * ((xa * d) @ b_paper.T), axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads["lambda_d"], np.sum(xa * ((g * lam_b) @ b_paper), axis=0), rtol=1e-5, atol=1e-5)


def test_vera_adapter_round_trip_stores_projections_per_target(vera_moved, params, tmp_path):
    from safetensors.numpy import load_file

    adapted = vera_moved
    checkpoint.save_adapter(tmp_path, adapted)
    names = set(load_file(os.path.join(tmp_path, checkpoint.ADAPTER_WEIGHTS)))
    # the projections come from the key, not the base: each of the 12 targets stores its slice
    assert len([n for n in names if "::frozen::" in n]) == 2 * 12
    restored = checkpoint.load_adapter(tmp_path, params)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.materialize(adapted)), jax.tree_util.tree_leaves(jpeft.materialize(restored))):
        np.testing.assert_array_equal(a, b)


def test_vera_shares_between_a_stacked_and_a_plain_target():
    keys = jax.random.split(jax.random.key(5), 2)
    tree = {"stack": {"kernel": jax.random.normal(keys[0], (2, 32, 64)) / 6}, "fc": {"kernel": jax.random.normal(keys[1], (32, 64)) / 6}}
    adapted = perturb(jpeft.apply(tree, "vera", key=jax.random.key(6), targets=ALL_KERNELS, r=8, layout={"stack/kernel": "sio"}),
                      jax.random.key(7), 0.3)
    stack, fc = adapted["stack"]["kernel"], adapted["fc"]["kernel"]
    assert stack.frozen["a"].shape == (2, 32, 8)  # a stacked node holds one copy per layer
    np.testing.assert_array_equal(stack.frozen["a"][1], fc.frozen["a"])
    np.testing.assert_array_equal(stack.frozen["b"][0], fc.frozen["b"])
    merged = jpeft.materialize(adapted)["stack"]["kernel"]
    t = stack.trainable
    for i in range(2):
        ref = f64(tree["stack"]["kernel"][i]) + (f64(fc.frozen["a"]) * f64(t["lambda_d"][i])) @ (f64(fc.frozen["b"]) * f64(t["lambda_b"][i]))
        np.testing.assert_allclose(merged[i], ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- DyLoRA

N_IN, N_OUT, R, ALPHA = 32, 64, 6, 12.0  # fc1 of the toy model


@pytest.fixture(scope="module")
def dy():
    """A DyLoRA node (r=6, alpha=12) on a non-square kernel, moved off its zero start."""
    kernel = jax.random.normal(jax.random.key(8), (N_IN, N_OUT)) / 5
    tree = jpeft.apply({"q_proj": {"kernel": kernel}}, "dylora", key=jax.random.key(9), targets="q_proj/kernel", r=R, alpha=ALPHA)
    x = jax.random.normal(jax.random.key(10), (9, N_IN))
    return perturb(tree, jax.random.key(11), 0.3), x


def truncated_update(node, b):
    """The paper's ``(α / b) W_up↓b W_dw↓b`` on the (in, out) kernel, float64."""
    a, up = f64(node.trainable["a"]), f64(node.trainable["b"])
    return (ALPHA / b) * a[:, :b] @ up[:b]


@pytest.fixture(scope="module")
def keyed_step():
    """``(y, grads of sum(g*y) w.r.t. the trainables and x)`` of a training step: one compile."""

    def step(trainable, frozen, x, g, key):
        loss = lambda t, x: jnp.sum(g * jpeft.linear(x, jpeft.combine(t, frozen), dropout_key=key))  # noqa: E731
        return jpeft.linear(x, jpeft.combine(trainable, frozen), dropout_key=key), jax.grad(loss, argnums=(0, 1))(trainable, x)

    return jax.jit(step)


@pytest.mark.parametrize("update", ["last", "all"])
def test_dylora_training_step_is_lora_truncated_at_the_drawn_rank(dy, keyed_step, update):
    tree, x = dy
    node = tree["q_proj"]["kernel"]
    node = node.replace(config=dylora.DyloraConfig(r=R, alpha=ALPHA, update=update))
    trainable, frozen = jpeft.partition(node)
    g = jax.random.normal(jax.random.key(12), (9, N_OUT))
    kernel, a, up = f64(node.frozen["kernel"]), f64(node.trainable["a"]), f64(node.trainable["b"])
    drawn = set()
    for seed in range(6):
        key = jax.random.key(100 + seed)
        b = int(dylora.sample_rank(key, node.config))
        drawn.add(b)
        y, (grads, dx) = keyed_step(trainable, frozen, x, g, key)
        np.testing.assert_allclose(y, f64(x) @ (kernel + truncated_update(node, b)), rtol=1e-5, atol=1e-5)
        s, gg, xx = ALPHA / b, f64(g), f64(x)
        np.testing.assert_allclose(dx, gg @ (kernel + truncated_update(node, b)).T, rtol=1e-5, atol=1e-5)
        grad_a, grad_b = np.zeros_like(a), np.zeros_like(up)
        trained = [b - 1] if update == "last" else list(range(b))  # the paper: only the b-th position learns
        grad_a[:, trained] = (s * xx.T @ gg @ up[:b].T)[:, trained]
        grad_b[trained] = (s * (xx @ a[:, :b]).T @ gg)[trained]
        np.testing.assert_allclose(grads.trainable["a"], grad_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads.trainable["b"], grad_b, rtol=1e-5, atol=1e-5)
    assert len(drawn) >= 3, drawn  # different keys, different ranks


def test_dylora_rank_marginal_is_uniform_on_1_to_r():
    config = dylora.DyloraConfig(r=R)
    ranks = np.asarray(jax.vmap(lambda k: dylora.sample_rank(k, config))(jax.random.split(jax.random.key(13), 6000)))
    counts = np.bincount(ranks, minlength=R + 1)
    assert counts[0] == 0 and counts.sum() == 6000 and len(counts) == R + 1
    # 1000 expected per rank, standard deviation ~29: 10% is over 3 of them
    assert np.all(np.abs(counts[1:] - 1000) < 100), counts


@pytest.mark.parametrize("rank", [1, 4, R])
def test_dylora_materialize_keeps_the_rank_and_both_paths_agree(dy, rank):
    tree, x = dy
    node = tree["q_proj"]["kernel"]
    merged = jpeft.materialize(tree, rank=rank)["q_proj"]["kernel"]
    np.testing.assert_allclose(merged, f64(node.frozen["kernel"]) + truncated_update(node, rank), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jpeft.core.materialize_node(node, rank=rank), merged)
    ranked = jpeft.with_rank(tree, rank)["q_proj"]["kernel"]
    assert ranked.config.rank == rank
    trainable, frozen = jpeft.partition(ranked)

    def loss(t, path):
        return jnp.sum(jnp.sin(jpeft.linear(x, jpeft.combine(t, frozen), path=path)))

    lf, gf = jax.value_and_grad(loss)(trainable, "factored")
    lm, gm = jax.value_and_grad(loss)(trainable, "materialized")
    np.testing.assert_allclose(lf, lm, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gm)):  # float32 sums of ~100-sized terms
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    # evaluation (no key) runs the set rank, and ranks past it get no gradient
    np.testing.assert_allclose(jpeft.linear(x, ranked), f64(x) @ f64(merged), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(gf.trainable["a"])[:, rank:]) and np.any(np.asarray(gf.trainable["a"])[:, :rank])


def test_dylora_rank_errors(dy, params):
    tree, _ = dy
    with pytest.raises(ValueError, match=r"rank=7 does not fit node 'q_proj/kernel' \(dylora.*rank=7 exceeds r=6"):
        jpeft.materialize(tree, rank=7)
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
        jpeft.materialize(tree, rank=0)
    lora = jpeft.apply(params, "lora", key=jax.random.key(0), r=2)
    with pytest.raises(ValueError, match=r"no node of the tree has an evaluation rank: \['model/layers_0/self_attn/k_proj/kernel "
                                         r"\(lora\)'.*up to their r \(dylora"):
        jpeft.materialize(lora, rank=2)
    with pytest.raises(ValueError, match=r"node \(lora\) has no evaluation rank"):
        jpeft.core.materialize_node(lora["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], rank=2)
    with pytest.raises(ValueError, match=r"eval_rank=7 exceeds r=6"):
        jpeft.apply(params, "dylora", key=jax.random.key(0), r=6, eval_rank=7)
    with pytest.raises(ValueError, match=r"update must be one of \('last', 'all'\), got 'first'"):
        dylora.DyloraConfig(update="first")


def test_dylora_adapter_keeps_its_evaluation_rank(dy, tmp_path):
    tree, _ = dy
    ranked = jpeft.with_rank(tree, 3)
    checkpoint.save_adapter(tmp_path, ranked)
    restored = checkpoint.load_adapter(tmp_path, {"q_proj": {"kernel": tree["q_proj"]["kernel"].frozen["kernel"]}})
    assert restored["q_proj"]["kernel"].config == ranked["q_proj"]["kernel"].config  # eval_rank=3 and update kept
    np.testing.assert_array_equal(jpeft.materialize(restored)["q_proj"]["kernel"], jpeft.materialize(tree, rank=3)["q_proj"]["kernel"])


def test_dylora_gets_a_training_key_without_dropout(dy):
    """Models pass a key only where ``uses_dropout`` says so (``jpeft.models.phi.Linear``):
    DyLoRA's rank draw needs one at dropout 0, LoRA at dropout 0 does not."""
    from jpeft.models import phi

    tree, x = dy
    layer = phi.Linear(features=N_OUT, dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.02)
    adapted = {"kernel": tree["q_proj"]["kernel"], "bias": jnp.zeros(N_OUT)}
    lora = jpeft.apply({"k": adapted["kernel"].frozen["kernel"]}, "lora", key=jax.random.key(0), targets="k", r=2, dropout=0.0)
    assert jpeft.core.uses_dropout(adapted["kernel"]) and not jpeft.core.uses_dropout(lora["k"])

    @jax.jit
    def run(p, merged):  # one compile: evaluation, the merged layer, training steps with 4 keys (one twice)
        train = [layer.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(k)}) for k in (0, 1, 2, 3, 0)]
        return layer.apply({"params": p}, x), layer.apply({"params": merged}, x), train

    evaluated, merged, trained = run(adapted, jpeft.materialize(adapted))
    np.testing.assert_allclose(evaluated, merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(trained[0], trained[4])  # the key decides the rank
    assert max(float(jnp.abs(t - evaluated).max()) for t in trained) > 1e-3  # ranks below r were drawn


# ----------------------------------------------------------- PEFT parity and counts


@pytest.fixture(scope="module")
def torch_peft():
    return pytest.importorskip("torch"), pytest.importorskip("peft")


def one_linear(torch, kernel):
    module = torch.nn.Sequential()
    module.add_module("q_proj", torch.nn.Linear(*kernel.shape, bias=False))
    with torch.no_grad():
        module.q_proj.weight.copy_(torch.tensor(np.asarray(kernel)).T)
    return module


def test_vera_matches_peft_outputs_and_gradients(vera_moved, torch_peft):
    """Same A, B (PEFT's vera_A, vera_B) and vectors: same outputs and vector gradients."""
    torch, peft = torch_peft
    node = node_at(vera_moved, "model", "layers_0", "mlp", "fc2", "kernel")  # non-square: 64 -> 32
    kernel = node.frozen["kernel"]
    x = jax.random.normal(jax.random.key(20), (2, 5, 64))
    trainable, frozen = jpeft.partition(node)
    loss = lambda t: jnp.sum(jnp.sin(jpeft.linear(x, jpeft.combine(t, frozen), path="factored")))  # noqa: E731
    grads = jax.grad(loss)(trainable).trainable

    model = peft.get_peft_model(one_linear(torch, kernel), peft.VeraConfig(r=8, target_modules=["q_proj"]))
    layer = model.base_model.model.q_proj
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        layer.vera_A["default"].copy_(t(node.frozen["a"]).T)
        layer.vera_B["default"].copy_(t(node.frozen["b"]).T)
        layer.vera_lambda_d["default"].copy_(t(node.trainable["lambda_d"]))
        layer.vera_lambda_b["default"].copy_(t(node.trainable["lambda_b"]))
    out = model(t(x))
    torch.sin(out).sum().backward()
    for path in ("factored", "materialized"):
        np.testing.assert_allclose(jpeft.linear(x, node, path=path), out.detach().numpy(), rtol=1e-5, atol=1e-5)
    for ours, theirs in ((grads["lambda_d"], layer.vera_lambda_d["default"]), (grads["lambda_b"], layer.vera_lambda_b["default"])):
        theirs = theirs.grad.numpy()
        assert np.linalg.norm(ours - theirs) <= 1e-5 * np.linalg.norm(theirs)


@pytest.mark.parametrize("rank", [2, R])
def test_dylora_at_a_rank_is_peft_lora_of_that_rank(dy, torch_peft, rank):
    torch, peft = torch_peft
    tree, x = dy
    node = tree["q_proj"]["kernel"]
    model = peft.get_peft_model(one_linear(torch, node.frozen["kernel"]), peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["q_proj"]))
    layer = model.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(node.trainable["a"][:, :rank]).T))
        layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(node.trainable["b"][:rank]).T))
        theirs = model(torch.tensor(np.asarray(x))).numpy()
    ranked = jpeft.with_rank(tree, rank)["q_proj"]["kernel"]
    np.testing.assert_allclose(jpeft.linear(x, ranked), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,hparams,expected", [("vera", dict(r=256), 165_888), ("dylora", dict(r=16, alpha=32.0), 4_718_592)])
def test_phi_qkv_parameter_counts_without_allocation(method, hparams, expected):
    """24 layers x Q/K/V (2048 x 2048) from shapes alone: VeRA 72 x (256 + 2048), what PEFT's
    VeraConfig(r=256) prints for Phi-1.5; DyLoRA that of LoRA r=16."""
    shapes = {"model": {f"layers_{i}": {"self_attn": {n: {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
                                                      for n in ("q_proj", "k_proj", "v_proj")}} for i in range(24)}}
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **hparams), shapes)
    assert jpeft.count_params(abstract)["trainable"] == expected


def test_cost_model_at_phi_size_against_lora():
    """One 2048 x 2048 Q/K/V layer, 4096 tokens, each method's defaults: the factored path
    wins, VeRA (r=256) within 1.25x of LoRA (r=16), DyLoRA equal to it."""
    node = lambda m: jax.eval_shape(  # noqa: E731
        lambda k: jpeft.apply({"q": {"kernel": k}}, m, key=jax.random.key(0), targets="q/kernel"),
        jax.ShapeDtypeStruct((2048, 2048), jnp.float32))["q"]["kernel"]
    cost = {m: jpeft.methods[m].flops(node(m), 4096) for m in ("lora", "vera", "dylora")}
    assert all(f < mat for f, mat in cost.values())
    assert 1.15 < cost["vera"][0] / cost["lora"][0] < 1.25
    assert cost["dylora"] == cost["lora"]
