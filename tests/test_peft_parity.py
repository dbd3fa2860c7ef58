"""Parity with HF PEFT (torch, CPU, float32): same adapter values -> same layer output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jpeft  # noqa: E402
from jpeft import bench, linalg  # noqa: E402
from conftest import perturb  # noqa: E402

N_IN, N_OUT = 48, 32  # non-square, so a transposed mapping cannot pass by accident


class OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(N_IN, N_OUT)

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


def ours_and_peft(base, method, hparams, peft_config):
    tree, x = base
    adapted = perturb(jpeft.apply(tree, method, key=jax.random.key(3), targets="q_proj/kernel", **hparams), jax.random.key(4), 0.3)
    node = adapted["q_proj"]["kernel"]
    ours = jpeft.linear(x, node, path="factored") + tree["q_proj"]["bias"]
    merged = jpeft.linear(x, node, path="materialized") + tree["q_proj"]["bias"]

    torch.manual_seed(0)
    module = OneLinear()
    with torch.no_grad():
        module.q_proj.weight.copy_(t(tree["q_proj"]["kernel"]).T)
        module.q_proj.bias.copy_(t(tree["q_proj"]["bias"]))
    model = peft.get_peft_model(module, peft_config).eval()
    return node, model.base_model.model.q_proj, model, np.asarray(ours), np.asarray(merged), x


def run(model, x):
    with torch.no_grad():
        return model(t(x)).numpy()


def check(ours, merged, theirs):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(merged, theirs, atol=1e-5, rtol=1e-5)


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


def test_oft_input_side(base):
    cfg = peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"], use_cayley_neumann=False)
    node, layer, model, ours, merged, x = ours_and_peft(base, "oft", dict(block_size=8, side="in"), cfg)
    with torch.no_grad():
        layer.oft_R["default"].weight.copy_(t(node.trainable["q"]))
    check(ours, merged, run(model, x))


def test_boft_single_factor(base):
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["q_proj"])
    node, layer, model, ours, merged, x = ours_and_peft(base, "boft", dict(block_size=4, n_butterfly=1), cfg)
    with torch.no_grad():
        layer.boft_R["default"].copy_(t(node.trainable["blocks"]))
        layer.boft_s["default"].copy_(t(node.trainable["scale"])[:, None])
    check(ours, merged, run(model, x))


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


def test_householder_chain_matches_hra():
    cfg = peft.HRAConfig(r=6, target_modules=["q_proj"], init_weights=False)
    torch.manual_seed(0)
    layer = peft.get_peft_model(OneLinear(), cfg).base_model.model.q_proj
    u = layer.hra_u["default"].detach().numpy()
    with torch.no_grad():
        expected = layer.get_delta_weight("default").numpy()
    np.testing.assert_allclose(linalg.householder_product(jnp.asarray(u)), expected, atol=1e-5)


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
