"""LoRA's PiSSA, OLoRA and rsLoRA variants, LoHa and (IA)³ against float64 numpy
references written from the papers' equations (in their (out × in) orientation, W = Kᵀ),
plus their identity-at-init bounds, adapter round trips, cost-model choices and Phi-1.5
Q/K/V counts. PEFT parity is in test_peft_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import bench, checkpoint
from jpeft.methods import lora
from jpeft.methods.registry import make_config
from conftest import rel_err

U32 = 2.0**-24  # float32 unit roundoff
SHAPES = [(48, 32), (32, 48)]  # (in, out) both ways, so a transposed mapping cannot pass


# numpy draws: each jax.random shape would compile, which dominates these small tests
def kernel_of(shape, seed=0, decay=0.9, dtype=jnp.float32):
    """An (in, out) kernel with singular values decay**i (distinct, so PiSSA's pairs are defined)."""
    rng = np.random.default_rng([seed, *shape])
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], min(shape))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], min(shape))))
    return jnp.asarray((u * decay ** np.arange(min(shape))) @ v.T, jnp.float32).astype(dtype)


def moved(node, scale=0.1, seed=2):
    """``node`` with every trainable array moved off its start by a random step."""
    rng = np.random.default_rng(seed)
    step = {k: jnp.asarray(v + scale * rng.standard_normal(v.shape), jnp.float32) for k, v in node.trainable.items()}
    return node.replace(trainable=step)


def inputs(rows, width, seed=3):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((rows, width)), jnp.float32)


def adapt(kernel, method, **hp):
    return jpeft.apply({"k": kernel}, method, key=jax.random.key(1), targets="k", **hp)["k"]


# ------------------------------------------------------------------ PiSSA, OLoRA, rsLoRA


def reference_split(kernel, init, r, scale):
    """PEFT's ``pissa_init``/``olora_init`` on ``W = Kᵀ`` in float64: ``(A, B, W - s B A)``."""
    w = np.asarray(kernel, np.float64).T
    if init == "pissa":
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(sv[:r] / scale)
        a, b = root[:, None] * vt[:r], u[:, :r] * root
    else:
        q, rr = np.linalg.qr(w)
        a, b = rr[:r], q[:, :r]
    return a, b, w - scale * b @ a


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("init,rslora", [("pissa", False), ("pissa", True), ("olora", False), ("olora", True)])
def test_residual_inits_match_float64_reference(shape, init, rslora):
    r, alpha = 4, 8.0
    kernel = kernel_of(shape)
    node = adapt(kernel, "lora", r=r, alpha=alpha, init=init, rslora=rslora)
    scale = alpha / (np.sqrt(r) if rslora else r)
    assert node.config.scale == scale and set(node.frozen) == {"residual", lora.BASE_CHECK[init]}
    a_ref, b_ref, residual_ref = reference_split(kernel, init, r, scale)
    a, b = np.asarray(node.trainable["a"], np.float64), np.asarray(node.trainable["b"], np.float64)
    # PiSSA: a singular pair's sign is LAPACK's choice; OLoRA: Householder QR signs, as torch
    sign = np.sign(np.sum(a * a_ref.T, axis=0)) if init == "pissa" else np.ones(r)
    assert init == "pissa" or np.all(np.sum(a * a_ref.T, axis=0) > 0)
    assert rel_err(a * sign, a_ref.T) < 1e-6 and rel_err(b * sign[:, None], b_ref.T) < 1e-6
    assert rel_err(node.frozen["residual"], residual_ref.T) < 1e-6
    # PiSSA: the base's top singular values; OLoRA: the norms of R_r's rows
    check = np.linalg.svd(kernel, compute_uv=False)[:r] if init == "pissa" else np.linalg.norm(a_ref, axis=1)
    assert rel_err(node.frozen[lora.BASE_CHECK[init]], check) < 1e-6
    if init == "pissa":  # s·ab is the best rank-r approximation; the residual holds the rest
        sv = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(scale * a @ b, compute_uv=False)[:r], sv[:r], rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(residual_ref), np.sqrt(np.sum(sv[r:] ** 2)), rtol=1e-9)
    else:  # B = Q_r has orthonormal columns (rows of our b)
        np.testing.assert_allclose(b @ b.T, np.eye(r), atol=1e-6)


@pytest.mark.parametrize("init,rslora,r", [("pissa", True, 4), ("pissa", False, 16), ("olora", False, 16), ("olora", True, 4)])
def test_residual_inits_start_at_the_base_up_to_rounding(params, init, rslora, r):
    """``materialize(apply(p))`` against ``p`` (relative Frobenius error per kernel, float32,
    every kernel of the toy model). PiSSA's residual and ``s a b`` are both at most ``||K||``:
    measured 9.3e-8 (r=16), pinned at 2u. OLoRA's residual ``K - s Q_r R_r`` is not divided
    by the scale, so its rounding grows with ``s``: measured 4.4e-7 at ``s = 16`` (rsLoRA,
    r=4), pinned at ``u (1 + s)``. The other inits are exact."""
    adapted = jpeft.apply(params, "lora", key=jax.random.key(1), targets=r".*/kernel", r=r, init=init, rslora=rslora)
    merged = jpeft.materialize(adapted)
    scale = lora.LoraConfig(r=r, rslora=rslora).scale  # alpha = 32
    bound = 2 * U32 if init == "pissa" else U32 * (1 + scale)
    errors = [rel_err(m, p) for m, p in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)) if p.ndim == 2]
    assert len(errors) == 12 and 0 < max(errors) <= bound, (max(errors), bound)
    exact = jpeft.materialize(jpeft.apply(params, "lora", key=jax.random.key(1), targets=r".*/kernel", r=r, rslora=rslora))
    assert all(bool(jnp.all(m == p)) for m, p in zip(jax.tree_util.tree_leaves(exact), jax.tree_util.tree_leaves(params)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_residual(init):
    """A bf16 base gives a bf16 residual: the start is off by its rounding (measured 8.0e-4
    for PiSSA, 1.5e-3 for OLoRA at s = 2, 256 × 256), pinned as in float32 with bf16's unit
    roundoff u = 2⁻⁹: 2u (PiSSA), u (1 + s) (OLoRA)."""
    kernel = kernel_of((256, 256), decay=0.98, dtype=jnp.bfloat16)
    node = adapt(kernel, "lora", r=16, init=init)
    assert node.frozen["residual"].dtype == jnp.bfloat16 and node.trainable["a"].dtype == jnp.float32
    merged = jpeft.materialize({"k": node})["k"]
    assert merged.dtype == jnp.bfloat16
    bound = 2.0**-9 * (2 if init == "pissa" else 1 + node.config.scale)
    assert 0 < rel_err(merged.astype(jnp.float32), kernel.astype(jnp.float32)) <= bound


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_is_rebuilt_from_the_base_on_loading(tmp_path, init):
    """The adapter stores ``a``, ``b`` and the base check vector; loading rebuilds the
    residual bit for bit, layer by layer for a stacked kernel (each layer its own SVD/QR),
    accepts the base cast to bf16 and refuses another base, such as the residual model."""
    stack = jnp.stack([kernel_of((32, 24)), kernel_of((32, 24), seed=1)])
    params = {"stack": {"kernel": stack}}
    node = jpeft.apply(params, "lora", key=jax.random.key(1), targets="stack/kernel", layout="sio", r=4, init=init,
                       rslora=True)["stack"]["kernel"]
    node = moved(node)
    adapted = {"stack": {"kernel": node}}
    check = lora.BASE_CHECK[init]
    assert set(node.frozen) == {"residual", check} and node.frozen["residual"].shape == (2, 32, 24)
    assert rel_err(node.frozen["residual"][0], node.frozen["residual"][1]) > 0.1  # per layer, not shared
    checkpoint.save_adapter(tmp_path, adapted)
    from safetensors.numpy import load_file

    stored = {"stack/kernel::trainable::a", "stack/kernel::trainable::b", f"stack/kernel::frozen::{check}"}
    assert set(load_file(tmp_path / checkpoint.ADAPTER_WEIGHTS)) == stored
    restored = checkpoint.load_adapter(tmp_path, params)["stack"]["kernel"]
    for name in node.frozen:
        np.testing.assert_array_equal(restored.frozen[name], node.frozen[name])
    assert restored.config == node.config
    np.testing.assert_array_equal(jpeft.materialize({"k": restored})["k"], jpeft.materialize({"k": node})["k"])
    bf16 = checkpoint.load_adapter(tmp_path, {"stack": {"kernel": stack.astype(jnp.bfloat16)}})["stack"]["kernel"]
    assert bf16.frozen["residual"].dtype == jnp.bfloat16
    residual_model = {"stack": {"kernel": node.frozen["residual"]}}
    with pytest.raises(ValueError, match=rf"'stack/kernel' was trained on another base: its {check} rebuilt"):
        checkpoint.load_adapter(tmp_path, residual_model)
    # frozen_from_base is init's frozen dict, and keeps the base for the other inits
    kernel = stack[0]
    config = lora.LoraConfig(r=4, init=init)
    rebuilt, made = lora.frozen_from_base(kernel, config), lora.init(None, kernel, config)[1]
    assert set(rebuilt) == set(made) == {"residual", check}
    for name in made:
        np.testing.assert_array_equal(rebuilt[name], made[name])
    assert lora.frozen_from_base(kernel, lora.LoraConfig(r=4))["kernel"] is kernel


def test_validation():
    with pytest.raises(ValueError, match=r"init must be one of \('gaussian', 'kaiming', 'pissa', 'olora'\), got 'zeros'"):
        lora.LoraConfig(init="zeros")
    with pytest.raises(ValueError, match="rslora must be True or False, got 'yes'"):
        lora.LoraConfig(rslora="yes")
    # DoRA shares LoRA's config but normalizes K + s·ab, so it keeps the base inits only
    with pytest.raises(ValueError, match=r"init must be one of \('gaussian', 'kaiming'\), got 'pissa'"):
        make_config("dora", init="pissa")
    assert make_config("dora", rslora=True).scale == 32 / 4
    with pytest.raises(ValueError, match="feedforward must be True or False, got 1"):
        make_config("ia3", feedforward=1)
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        make_config("loha", r=0)
    with pytest.raises(ValueError, match=r"loha cannot adapt 'k': r=33 exceeds min\(in, out\) = 32"):
        adapt(jnp.zeros((32, 48)), "loha", r=33)


# --------------------------------------------------------------------------------- LoHa


@pytest.mark.parametrize("shape", SHAPES)
def test_loha_matches_float64_reference(shape):
    """``W' = W + s (B₁A₁) ⊙ (B₂A₂)`` with PEFT's ``hada_w1_a = B₁ = w1_aᵀ`` etc.; exactly the
    base at init (``w2_b = 0``), with PEFT's init bounds."""
    kernel = kernel_of(shape)
    start = adapt(kernel, "loha", r=4, alpha=6.0)
    np.testing.assert_array_equal(jpeft.materialize({"k": start})["k"], kernel)
    bounds = {"w1_a": 1 / 2, "w2_a": 1 / 2, "w1_b": 1 / np.sqrt(shape[0])}
    for name, bound in bounds.items():
        assert bound / 2 < float(jnp.abs(start.trainable[name]).max()) <= bound, name
    assert not np.any(start.trainable["w2_b"])
    node = moved(start)
    w1a, w1b, w2a, w2b = (np.asarray(node.trainable[k], np.float64).T for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
    expected = np.asarray(kernel, np.float64).T + 1.5 * (w1a @ w1b) * (w2a @ w2b)
    assert rel_err(jpeft.materialize({"k": node})["k"], expected.T) < 1e-6
    x = inputs(7, shape[0])
    assert rel_err(jpeft.linear(x, node, path="factored"), np.asarray(x, np.float64) @ expected.T) < 1e-6


def test_loha_cost_model_picks_by_rank():
    """On a 2048² layer with 4096 tokens the rank-r² factored path wins while r² < nm/(3(n+m))
    = 341: r = 16 (256) factored, r = 32 (1024) materialized."""
    shapes = {"k": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
    picks = {}
    for r in (16, 32):
        node = jax.eval_shape(lambda s: jpeft.apply(s, "loha", key=jax.random.key(0), targets="k", r=r), shapes)["k"]
        factored, materialized = jpeft.methods["loha"].flops(node, 4096)
        picks[r] = "factored" if factored <= materialized else "materialized"
    assert picks == {16: "factored", 32: "materialized"}


# --------------------------------------------------------------------------------- (IA)³


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_matches_float64_reference(shape, feedforward):
    """``W' = diag(l) W`` (outputs) or ``W diag(l)`` (inputs, ``feedforward``); exactly ``W``
    at init; factored equals materialized with gradients (the generic tests cover only the
    output side)."""
    kernel = kernel_of(shape)
    start = adapt(kernel, "ia3", feedforward=feedforward)
    assert start.trainable["l"].shape == (shape[0] if feedforward else shape[1],)
    np.testing.assert_array_equal(jpeft.materialize({"k": start})["k"], kernel)
    node = moved(start)
    w, l = np.asarray(kernel, np.float64).T, np.asarray(node.trainable["l"], np.float64)
    expected = w * l[None, :] if feedforward else l[:, None] * w
    assert rel_err(jpeft.materialize({"k": node})["k"], expected.T) < 1e-6
    trainable, frozen = jpeft.partition(node)
    x = inputs(7, shape[0])
    grads = {}
    for path in ("factored", "materialized"):
        loss = lambda t: jnp.sum(jnp.sin(jpeft.linear(x, jpeft.combine(t, frozen), path=path)))
        grads[path] = jax.grad(loss)(trainable).trainable["l"]
    assert float(jnp.abs(grads["factored"]).max()) > 0.1 and rel_err(grads["factored"], grads["materialized"]) < 1e-5


def test_ia3_input_side_cost_model_counts_what_xla_compiles():
    """``feedforward=True`` (the generic XLA check runs the output side): within 6 %."""
    n, tokens = 128, 256
    node = adapt(kernel_of((n, n)), "ia3", feedforward=True)
    trainable, frozen = jpeft.partition(node)
    x = inputs(tokens, n)
    for path, expected in zip(("factored", "materialized"), jpeft.methods["ia3"].flops(node, tokens)):
        step = lambda t, x, path=path: jnp.sum(jpeft.linear(x, jpeft.combine(t, frozen), path=path) ** 2)
        compiled = jax.jit(jax.grad(step, argnums=(0, 1))).lower(trainable, x).compile()
        counted = 1e12 * bench.compiled_analysis(compiled)["xla_tflop_per_step"]
        assert abs(counted / expected - 1) < 0.06, (path, counted, expected)


# ------------------------------------------------------------------------- Phi-1.5 counts


@pytest.mark.parametrize("method,hparams,trainable", [
    ("lora", dict(init="pissa"), 4_718_592),  # 72 × 16 × (2048 + 2048)
    ("lora", dict(init="olora", rslora=True), 4_718_592),
    ("loha", {}, 9_437_184),  # 72 × 2 × 16 × (2048 + 2048)
    ("ia3", {}, 147_456),  # 72 × 2048
    ("ia3", dict(feedforward=True), 147_456),
])
def test_phi_qkv_counts(method, hparams, trainable):
    """24 layers × Q/K/V (2048 × 2048), from shapes alone. PiSSA/OLoRA hold the residual
    instead of the base, and a length-16 base check; the others the base itself."""
    qkv = {n: {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)} for n in ("q_proj", "k_proj", "v_proj")}
    shapes = {f"layers_{i}": qkv for i in range(24)}
    abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **hparams), shapes)
    counts = jpeft.count_params(abstract)
    residual = method == "lora"
    assert counts["trainable"] == trainable and counts["frozen"] == 72 * 2048 * 2048 + (72 * 16 if residual else 0)
    node = abstract["layers_0"]["q_proj"]["kernel"]
    assert set(node.frozen) == ({"residual", lora.BASE_CHECK[hparams["init"]]} if residual else {"kernel"})
