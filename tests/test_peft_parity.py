"""Parity with HF PEFT (torch, CPU, float32): same adapter values -> same layer output and
same gradients of the adapter arrays, on jpeft's factored and materialized paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jpeft  # noqa: E402
from jpeft import bench, linalg  # noqa: E402
from conftest import perturb, rel_err  # noqa: E402

N_IN, N_OUT = 48, 32  # non-square, so a transposed mapping cannot pass by accident


class OneLinear(torch.nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.q_proj = torch.nn.Linear(N_IN, N_OUT, bias=bias)

    def forward(self, x):
        return self.q_proj(x)


def t(x) -> "torch.Tensor":
    return torch.tensor(np.asarray(x, np.float32))


@pytest.fixture(scope="module")
def base():
    key = jax.random.key(0)
    kernel = jax.random.normal(key, (N_IN, N_OUT)) / np.sqrt(N_IN)
    bias = 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (N_OUT,))
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 5, N_IN))
    return {"q_proj": {"kernel": kernel, "bias": bias}}, x


def ours_and_peft(base, method, hparams, peft_config, bias=True):
    """Our node (trainables moved off their start), PEFT's layer, model and both our outputs;
    ``bias=False``: a bias-free layer on both sides."""
    tree, x = base
    adapted = perturb(jpeft.apply(tree, method, key=jax.random.key(3), targets="q_proj/kernel", **hparams), jax.random.key(4), 0.3)
    node = adapted["q_proj"]["kernel"]
    b = tree["q_proj"]["bias"] if bias else 0.0
    ours = jpeft.linear(x, node, path="factored") + b
    merged = jpeft.linear(x, node, path="materialized") + b

    torch.manual_seed(0)
    module = OneLinear(bias=bias)
    with torch.no_grad():
        module.q_proj.weight.copy_(t(tree["q_proj"]["kernel"]).T)
        if bias:
            module.q_proj.bias.copy_(t(tree["q_proj"]["bias"]))
    model = peft.get_peft_model(module, peft_config).eval()
    return node, model.base_model.model.q_proj, model, np.asarray(ours), np.asarray(merged), x


def run(model, x):
    with torch.no_grad():
        return model(t(x)).numpy()


def check(ours, merged, theirs):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(merged, theirs, atol=1e-5, rtol=1e-5)


GRAD_RTOL = 1e-5  # relative norm error of each adapter array's gradient, float32


def check_grads(node, model, x, pairs, correction=None):
    """Gradients of ``<c, y>`` (``c`` a fixed random cotangent) w.r.t. every trainable array:
    ours by ``jax.grad`` on both paths, PEFT's by torch autograd, agree to ``GRAD_RTOL``
    (the layer's bias adds a constant to ``y``: no part of these gradients).

    ``pairs`` maps each of our trainable names to ``(PEFT parameter, its gradient in our
    layout)``; ``correction(name, c)``, if given, is added to PEFT's side (a written-out
    difference of the two definitions)."""
    assert set(pairs) == set(node.trainable), sorted(node.trainable)
    c = np.random.default_rng(0).standard_normal((*x.shape[:-1], node.shape[1])).astype(np.float32)
    model.zero_grad()
    torch.sum(model(t(x)) * t(c)).backward()
    trainable, frozen = jpeft.partition(node)
    for path in ("factored", "materialized"):
        loss = lambda tr: jnp.sum(jpeft.linear(x, jpeft.combine(tr, frozen), path=path) * c)
        ours = jax.grad(loss)(trainable).trainable
        for name, (param, to_ours) in pairs.items():
            theirs = to_ours(param.grad.numpy()) + (0.0 if correction is None else correction(name, c))
            assert np.shape(ours[name]) == np.shape(theirs), (path, name)
            assert rel_err(ours[name], theirs) <= GRAD_RTOL, (path, name, rel_err(ours[name], theirs))


T = lambda g: g.T  # noqa: E731  (PEFT's (out, in)-oriented factor -> ours)
SAME = lambda g: g  # noqa: E731


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora(base, use_dora):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], use_dora=use_dora)
    node, layer, model, ours, merged, x = ours_and_peft(base, "dora" if use_dora else "lora", dict(r=4, alpha=8.0, dropout=0.0), cfg)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t(node.trainable["a"]).T)
        layer.lora_B["default"].weight.copy_(t(node.trainable["b"]).T)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(t(node.trainable["magnitude"]))
    check(ours, merged, run(model, x))
    pairs = {"a": (layer.lora_A["default"].weight, T), "b": (layer.lora_B["default"].weight, T)}
    if use_dora:
        pairs["magnitude"] = (layer.lora_magnitude_vector["default"].weight, SAME)
    check_grads(node, model, x, pairs)


@pytest.mark.parametrize("r", [2, 8])  # r=2: w2 factored (w2_in @ w2_out); r=8: w2 full
def test_lokr(base, r):
    cfg = peft.LoKrConfig(r=r, alpha=2 * r, target_modules=["q_proj"])
    node, layer, model, ours, merged, x = ours_and_peft(base, "lokr", dict(r=r, alpha=2.0 * r), cfg)
    tr = node.trainable
    with torch.no_grad():
        layer.lokr_w1["default"].copy_(t(tr["w1"]).T)
        if "w2" in tr:
            layer.lokr_w2["default"].copy_(t(tr["w2"]).T)
        else:
            layer.lokr_w2_a["default"].copy_(t(tr["w2_out"]).T)
            layer.lokr_w2_b["default"].copy_(t(tr["w2_in"]).T)
    assert ("w2" in tr) == (r == 8)
    check(ours, merged, run(model, x))
    pairs = {"w1": (layer.lokr_w1["default"], T)}
    if "w2" in tr:
        pairs["w2"] = (layer.lokr_w2["default"], T)
    else:
        pairs |= {"w2_out": (layer.lokr_w2_a["default"], T), "w2_in": (layer.lokr_w2_b["default"], T)}
    check_grads(node, model, x, pairs)


def test_oft_input_side(base):
    cfg = peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"], use_cayley_neumann=False)
    node, layer, model, ours, merged, x = ours_and_peft(base, "oft", dict(block_size=8, side="in"), cfg)
    with torch.no_grad():
        layer.oft_R["default"].weight.copy_(t(node.trainable["q"]))
    check(ours, merged, run(model, x))
    check_grads(node, model, x, {"q": (layer.oft_R["default"].weight, SAME)})


def test_boft_single_factor(base):
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["q_proj"])
    node, layer, model, ours, merged, x = ours_and_peft(base, "boft", dict(block_size=4, n_butterfly=1), cfg)
    with torch.no_grad():
        layer.boft_R["default"].copy_(t(node.trainable["blocks"]))
        layer.boft_s["default"].copy_(t(node.trainable["scale"])[:, None])
    check(ours, merged, run(model, x))
    pairs = {"blocks": (layer.boft_R["default"], SAME), "scale": (layer.boft_s["default"], lambda g: g[:, 0])}
    check_grads(node, model, x, pairs)


def test_boft_butterfly_factors_match_peft_construction(base):
    """PEFT on CPU falls back to one factor, so build its multi-factor matrix with its own
    permutation and Cayley functions, composed as in ``BOFTLayer.get_delta_weight``."""
    f, b = 3, 4
    node, layer, *_ = ours_and_peft(base, "boft", dict(block_size=b, n_butterfly=f), peft.BOFTConfig(boft_block_size=b, target_modules=["q_proj"]))
    blocks = t(node.trainable["blocks"])
    num = N_IN // b
    rot = layer.cayley_batch(blocks.reshape(f * num, b, b)).reshape(f, num, b, b)
    mat = torch.eye(N_IN)
    for i in range(f):
        perm = layer.block_butterfly_perm(N_IN, num // 2**i, b // 2, f - 1)
        p = layer.perm2mat(perm)
        mat = (p @ torch.block_diag(*rot[i]) @ p.T) @ mat
    np.testing.assert_array_equal(
        layer.block_butterfly_perm(N_IN, num // 2, b // 2, f - 1).numpy(), node.config.permutations(N_IN)[1]
    )
    expected = (mat.numpy() @ np.asarray(base[0]["q_proj"]["kernel"])) * np.asarray(node.trainable["scale"])
    np.testing.assert_allclose(jpeft.materialize({"k": node})["k"], expected, atol=1e-5)


def test_hra(base):
    """Same ``hra_u`` -> same output; and PEFT's paired init is an identity start like ours."""
    node, layer, model, ours, merged, x = ours_and_peft(base, "hra", dict(r=4), peft.HRAConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        initial = layer.get_delta_weight("default").numpy()
        layer.hra_u["default"].copy_(t(node.trainable["u"]))
    np.testing.assert_allclose(initial, np.eye(N_IN), atol=1e-5)
    check(ours, merged, run(model, x))
    check_grads(node, model, x, {"u": (layer.hra_u["default"], SAME)})


def test_householder_chain_matches_hra():
    cfg = peft.HRAConfig(r=6, target_modules=["q_proj"], init_weights=False)
    torch.manual_seed(0)
    layer = peft.get_peft_model(OneLinear(), cfg).base_model.model.q_proj
    u = layer.hra_u["default"].detach().numpy()
    with torch.no_grad():
        expected = layer.get_delta_weight("default").numpy()
    np.testing.assert_allclose(linalg.householder_product(jnp.asarray(u)), expected, atol=1e-5)


LORA_VARIANTS = [("pissa", False), ("pissa", True), ("olora", False), ("olora", True), ("gaussian", True)]


@pytest.mark.parametrize("init,rslora", LORA_VARIANTS)
def test_lora_inits_and_rslora(base, init, rslora):
    """PiSSA, OLoRA (alpha/r = 2 and rsLoRA's alpha/sqrt(r) = 4, so PiSSA's division by the
    scale matters) and rsLoRA: PEFT's own init from the same base weight gives our ``a``,
    ``b`` and residual (PiSSA up to the sign of each singular pair: PEFT's float32 SVD
    agrees with our float64 one to 1.3e-5, OLoRA's QR, same signs, to 1e-7); then, with our
    values copied in (residual as PEFT's base weight), outputs and gradients agree."""
    hp = dict(r=4, alpha=8.0, dropout=0.0, init=init, rslora=rslora)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], init_lora_weights=init,
                          use_rslora=rslora)
    node, layer, model, ours, merged, x = ours_and_peft(base, "lora", hp, cfg)
    assert layer.scaling["default"] == node.config.scale == (4.0 if rslora else 2.0)
    if init != "gaussian":
        start = jpeft.apply(base[0], "lora", key=jax.random.key(3), targets="q_proj/kernel", **hp)["q_proj"]["kernel"]
        a, b = np.asarray(start.trainable["a"]), np.asarray(start.trainable["b"])
        peft_a, peft_b = (layer.lora_A["default"].weight.detach().numpy().T, layer.lora_B["default"].weight.detach().numpy().T)
        sign = np.sign(np.sum(a * peft_a, axis=0)) if init == "pissa" else np.ones(4)
        tol = 1e-4 if init == "pissa" else 1e-6  # measured 1.3e-5 and 1.1e-7
        assert rel_err(a * sign, peft_a) <= tol and rel_err(b * sign[:, None], peft_b) <= tol
        residual = layer.base_layer.weight.detach().numpy().T  # PEFT overwrote the base weight with it
        # float32 rounding in PEFT: measured 1.9e-6 (PiSSA), 1.8e-7 (OLoRA)
        assert rel_err(start.frozen["residual"], residual) <= (1e-5 if init == "pissa" else 1e-6)
        assert rel_err(residual, base[0]["q_proj"]["kernel"]) > 0.1  # a real split, not the base
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t(node.trainable["a"]).T)
        layer.lora_B["default"].weight.copy_(t(node.trainable["b"]).T)
        if init != "gaussian":
            layer.base_layer.weight.copy_(t(node.frozen["residual"]).T)
    check(ours, merged, run(model, x))
    pairs = {"a": (layer.lora_A["default"].weight, T), "b": (layer.lora_B["default"].weight, T)}
    check_grads(node, model, x, pairs)


def test_loha(base):
    """Same factors -> same output and gradients (rank_dropout = module_dropout = 0); PEFT's
    init zeroes the same factor (``hada_w2_b``) and draws the other three from the same bounds."""
    cfg = peft.LoHaConfig(r=4, alpha=8, rank_dropout=0.0, module_dropout=0.0, target_modules=["q_proj"])
    node, layer, model, ours, merged, x = ours_and_peft(base, "loha", dict(r=4, alpha=8.0), cfg)
    names = {k: f"hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
    start = jpeft.apply(base[0], "loha", key=jax.random.key(3), targets="q_proj/kernel", r=4, alpha=8.0)["q_proj"]["kernel"]
    bounds = {"w1_a": 0.5, "w1_b": 1 / np.sqrt(N_IN), "w2_a": 0.5, "w2_b": 0.0}  # 1/sqrt(r), 1/sqrt(in), zeros
    for ours_name, theirs_name in names.items():
        theirs = getattr(layer, theirs_name)["default"].detach().numpy().T
        assert theirs.shape == start.trainable[ours_name].shape, ours_name
        for values in (theirs, np.asarray(start.trainable[ours_name])):
            assert np.abs(values).max() <= bounds[ours_name] and np.abs(values).max() >= 0.5 * bounds[ours_name], ours_name
    with torch.no_grad():
        for ours_name, theirs_name in names.items():
            getattr(layer, theirs_name)["default"].copy_(t(node.trainable[ours_name]).T)
    check(ours, merged, run(model, x))
    check_grads(node, model, x, {k: (getattr(layer, v)["default"], T) for k, v in names.items()})


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3(base, feedforward):
    """Bias-free layer: same ``l`` -> same output and gradient, on both sides of the kernel.
    PEFT starts ``ia3_l`` at ones as we do."""
    cfg = peft.IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"] if feedforward else [])
    node, layer, model, ours, merged, x = ours_and_peft(base, "ia3", dict(feedforward=feedforward), cfg, bias=False)
    param = layer.ia3_l["default"]
    assert tuple(param.shape) == ((1, N_IN) if feedforward else (N_OUT, 1))
    np.testing.assert_array_equal(param.detach().numpy(), 1.0)
    with torch.no_grad():
        param.copy_(t(node.trainable["l"]).reshape(param.shape))
    check(ours, merged, run(model, x))
    check_grads(node, model, x, {"l": (param, lambda g: g.reshape(-1))})


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_on_a_biased_layer(base, feedforward):
    """PEFT's output-side (IA)³ scales the bias too, ``l ⊙ (x K + b)``; a jpeft node scales
    the kernel's output alone, ``l ⊙ (x K) + b``: PEFT's output is ours plus ``(l - 1) ⊙ b``
    and its gradient of ``l`` ours plus ``Σ_t c ⊙ b``. The input side agrees exactly."""
    cfg = peft.IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"] if feedforward else [])
    node, layer, model, ours, merged, x = ours_and_peft(base, "ia3", dict(feedforward=feedforward), cfg)
    bias, l = np.asarray(base[0]["q_proj"]["bias"]), np.asarray(node.trainable["l"])
    param = layer.ia3_l["default"]
    with torch.no_grad():
        param.copy_(t(l).reshape(param.shape))
    gap = 0.0 if feedforward else (l - 1) * bias
    assert feedforward or np.abs(gap).max() > 1e-2  # the difference is real at this l
    check(ours + gap, merged + gap, run(model, x))
    extra = None if feedforward else (lambda name, c: -np.sum(c, axis=(0, 1)) * bias)
    check_grads(node, model, x, {"l": (param, lambda g: g.reshape(-1))}, correction=extra)


def _phi_peft_trainable(config):
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiConfig(
        vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, partial_rotary_factor=0.5, max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = PhiForCausalLM(phi)
    model = peft.get_peft_model(model, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_counts_match_peft_for_phi_qkv():
    """PEFT instantiated on the meta device (no allocation) vs jpeft under eval_shape."""
    targets = ["q_proj", "k_proj", "v_proj"]
    shapes = {
        "model": {
            f"layers_{i}": {"self_attn": {n: {"kernel": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)} for n in targets}}
            for i in range(24)
        }
    }
    cases = [
        ("lora", dict(r=16, alpha=32.0), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets), 4_718_592),
        ("dora", dict(r=16, alpha=32.0), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, use_dora=True), 4_866_048),
        ("lokr", dict(r=16, alpha=32.0), peft.LoKrConfig(r=16, alpha=32, target_modules=targets), 221_184),
        ("oft", dict(block_size=64), peft.OFTConfig(r=0, oft_block_size=64, target_modules=targets), 4_644_864),
        ("boft", dict(block_size=8, n_butterfly=1), peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=targets), 1_327_104),
    ]
    for method, hparams, cfg, documented in cases:
        abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **hparams), shapes)
        ours = jpeft.count_params(abstract)["trainable"]
        assert ours == _phi_peft_trainable(cfg) == documented, method
        # the benchmark's mapping of jpeft's hyper-parameters gives PEFT the same adapter
        assert _phi_peft_trainable(bench.peft_config(method, hparams, targets)) == documented, method
    assert _phi_peft_trainable(bench.peft_config("hra", {}, targets)) == 72 * 16 * 2048  # HRA r=16: r vectors of length in
    # PEFT cannot run PiSSA's or OLoRA's SVD/QR on the meta device; their counts are LoRA's
    lora_cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    cases = [
        ("lora", dict(init="pissa"), lora_cfg, 4_718_592),
        ("lora", dict(init="olora", rslora=True), lora_cfg, 4_718_592),
        ("loha", {}, peft.LoHaConfig(r=16, alpha=32, target_modules=targets), 9_437_184),
        ("ia3", {}, peft.IA3Config(target_modules=targets, feedforward_modules=[]), 147_456),
        ("ia3", dict(feedforward=True), peft.IA3Config(target_modules=targets, feedforward_modules=targets), 147_456),
    ]
    for method, hparams, cfg, documented in cases:
        abstract = jax.eval_shape(lambda s: jpeft.apply(s, method, key=jax.random.key(0), **hparams), shapes)
        assert jpeft.count_params(abstract)["trainable"] == _phi_peft_trainable(cfg) == documented, (method, hparams)
