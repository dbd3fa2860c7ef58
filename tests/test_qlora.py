"""QLoRA: a quantized frozen base under every method (jpeft.quantize, jpeft.apply, wrap,
the Phi port, checkpoints, counts). The kernels themselves (bit-exact with bitsandbytes) are
tested in tests/test_quant.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint
from jpeft.models import phi
from conftest import METHODS, SMALL_HPARAMS, perturb, rel_err

TARGETS = r".*(q_proj|fc1)/kernel"
X = jax.random.normal(jax.random.key(7), (6, 32))


@pytest.fixture(scope="module")
def qparams(params):
    return jpeft.quantize(params, "nf4")


def mlp(p, x):
    """Uses q_proj and fc1 (adapted) and k_proj (quantized, not adapted) of layer 0."""
    layer = p["model"]["layers_0"]
    h = jnp.tanh(x @ layer["self_attn"]["q_proj"]["kernel"] + x @ layer["self_attn"]["k_proj"]["kernel"])
    return jnp.sin(h @ layer["mlp"]["fc1"]["kernel"])


def test_quantize_replaces_every_kernel_and_dequantize_inverts_it(params, qparams):
    leaves = dict(jpeft.tree.leaves_with_paths(qparams))
    kernels = [p for p in leaves if p.endswith("kernel")]
    assert len(kernels) == 12 and all(jpeft.is_quantized(leaves[p]) for p in kernels)
    assert not any(jpeft.is_quantized(x) for p, x in leaves.items() if not p.endswith("kernel"))
    q = leaves["model/layers_0/mlp/fc1/kernel"]
    assert q.shape == (32, 64) and q.parts["codes"].dtype == jnp.uint8 and q.parts["codes"].shape == (32 * 64 // 2,)
    back = jpeft.dequantize(qparams)
    k, kq = params["model"]["layers_0"]["mlp"]["fc1"]["kernel"], back["model"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert kq.dtype == k.dtype and 0 < rel_err(kq, k) < 0.15  # 4 bits: close, not equal
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    counts = jpeft.count_params(qparams)
    assert counts["frozen"] == jpeft.count_params(params)["frozen"]  # parameters, not codes
    assert counts["frozen_bytes"] < 0.3 * jpeft.count_params(params)["frozen_bytes"]


@pytest.mark.parametrize("method", METHODS + ["lora-pissa"])
def test_every_method_over_a_quantized_base_equals_the_dequantized_base(params, qparams, method):
    """Outputs and gradients through jpeft.wrap (adapted and unadapted quantized kernels) and
    jpeft.linear over the quantized base = those over its dequantized arrays (<= 1e-5
    relative); apply reads the dequantized weight (the same init as on jpeft.dequantize(qparams))."""
    name, hp = ("lora", dict(SMALL_HPARAMS["lora"], init="pissa")) if method == "lora-pissa" else (method, SMALL_HPARAMS[method])
    adapted = jpeft.apply(qparams, name, key=jax.random.key(1), targets=TARGETS, **hp)
    node = adapted["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    frozen_quantized = [k for k, v in node.frozen.items() if jpeft.is_quantized(v)]
    assert frozen_quantized == (["residual"] if method == "lora-pissa" else ["kernel"] if "kernel" in node.frozen else [])
    on_plain = jpeft.apply(jpeft.dequantize(qparams), name, key=jax.random.key(1), targets=TARGETS, **hp)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.partition(adapted)[0]), jax.tree_util.tree_leaves(jpeft.partition(on_plain)[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    adapted = perturb(adapted, jax.random.key(2))
    reference = jpeft.dequantize(adapted)
    trainable, frozen = jpeft.partition(adapted)
    frozen_ref = jpeft.partition(reference)[1]

    def loss(t, f):
        p = jpeft.combine(t, f)
        fc1 = p["model"]["layers_1"]["mlp"]["fc1"]["kernel"]
        return jnp.sum(jpeft.wrap(mlp)(p, X) ** 2) + jnp.sum(jnp.cos(jpeft.linear(X, fc1)))

    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile per tree kind: quantized, dequantized
    (ours, grads), (ref, grads_ref) = value_and_grad(trainable, frozen), value_and_grad(trainable, frozen_ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        assert rel_err(a, b) <= 1e-5 or float(jnp.abs(b).max()) == 0.0
    merged = jpeft.materialize(adapted)["model"]["layers_0"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_allclose(merged, jpeft.materialize(reference)["model"]["layers_0"]["mlp"]["fc1"]["kernel"], atol=1e-6)
    assert not any(jpeft.is_quantized(x) for x in jax.tree_util.tree_leaves(jpeft.materialize(adapted), is_leaf=jpeft.is_quantized))


def test_the_backward_pass_keeps_no_dequantized_weight(qparams, capsys):
    """The dequantization runs in a remat region: the residuals saved for the backward pass
    are the codes and the activations, never a full-precision (in, out) weight."""
    adapted = jpeft.apply(qparams, "lora", key=jax.random.key(1), targets=TARGETS, r=4)
    trainable, frozen = jpeft.partition(adapted)
    capsys.readouterr()
    print_saved_residuals(lambda t: jnp.sum(jpeft.wrap(mlp)(jpeft.combine(t, frozen), X) ** 2), trainable)
    saved = capsys.readouterr().out
    assert "f32[6,32]" in saved and "f32[32,32]" not in saved and "f32[32,64]" not in saved, saved


def test_phi_port_and_scan_over_quantized_kernels(tmp_path):
    model, params = phi.init(phi.config("tiny"), jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 1024)
    qparams = jpeft.quantize(params, "nf4")
    assert not jpeft.is_quantized(qparams["lm_head"]["kernel"])  # the output head stays
    adapted = perturb(jpeft.apply(qparams, "lora", key=jax.random.key(2), r=4), jax.random.key(3))
    logits = model.apply({"params": adapted}, ids)
    np.testing.assert_allclose(logits, model.apply({"params": jpeft.dequantize(adapted)}, ids), rtol=1e-5, atol=1e-5)
    # adapters hold no quantized base; they load back onto the quantized model
    checkpoint.save_adapter(tmp_path / "adapter", adapted)
    from safetensors.numpy import load_file

    assert all("::trainable::" in k for k in load_file(tmp_path / "adapter" / checkpoint.ADAPTER_WEIGHTS))
    back = checkpoint.load_adapter(tmp_path / "adapter", qparams)
    np.testing.assert_array_equal(model.apply({"params": back}, ids), logits)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(64)(h)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    x = jax.random.normal(jax.random.key(4), (2, 64))
    sparams = stack.init(jax.random.key(5), x, None)["params"]
    sq = jpeft.quantize(sparams, "nf4", targets=r".*kernel", layout="sio")
    assert sq["Dense_0"]["kernel"].parts["codes"].shape == (3, 64 * 64 // 2)
    fn = lambda p, x: stack.apply({"params": p}, x, None)[0]
    out = jpeft.wrap(fn)(sq, x)
    np.testing.assert_allclose(out, fn(jpeft.dequantize(sq), x), rtol=1e-5, atol=1e-6)
    sa = perturb(jpeft.apply(sq, "lora", key=jax.random.key(6), targets=r".*kernel", layout="sio", r=2), jax.random.key(7))
    np.testing.assert_allclose(jpeft.wrap(fn)(sa, x), jpeft.wrap(fn)(jpeft.dequantize(sa), x), rtol=1e-5, atol=1e-6)


def test_phi15_frozen_bytes_from_shapes():
    """NF4 with double quantization: <= 0.53 bytes per quantized parameter; the bf16 model
    2 bytes per parameter (jax.eval_shape: nothing is allocated)."""
    shapes = jax.eval_shape(lambda k: phi.init(phi.config("phi-1.5"), k, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)[1],
                            jax.random.key(0))
    dense = jpeft.count_params(shapes)
    assert dense["frozen"] == 1_418_270_720 and dense["frozen_bytes"] == 2 * dense["frozen"]
    quantized = jax.eval_shape(lambda p: jpeft.quantize(p, "nf4"), shapes)
    q_leaves = [x for x in jax.tree_util.tree_leaves(quantized, is_leaf=jpeft.is_quantized) if jpeft.is_quantized(x)]
    q_params = sum(int(np.prod(x.shape)) for x in q_leaves)
    assert len(q_leaves) == 24 * 6 and q_params == 24 * (4 * 2048 * 2048 + 2 * 2048 * 8192)
    assert sum(x.nbytes for x in q_leaves) / q_params <= 0.53
    counts = jpeft.count_params(quantized)
    assert counts["frozen"] == dense["frozen"]
    assert counts["frozen_bytes"] == sum(x.nbytes for x in q_leaves) + 2 * (dense["frozen"] - q_params)


def test_bad_input_is_named(params, qparams):
    with pytest.raises(ValueError, match=r"kind must be one of \('nf4', 'fp4', 'int8'\), got 'nf3'"):
        jpeft.quantize(params, "nf3")
    with pytest.raises(ValueError, match=r"block_size=48 does not divide the 2048 elements of 'model/layers_0/mlp/fc1/kernel' \(shape \(32, 64\)\)"):
        jpeft.quantize(params, "nf4", block_size=48)
    with pytest.raises(ValueError, match=r"'model/layers_0/mlp/fc1/kernel' is already quantized \(nf4, block 64\)"):
        jpeft.quantize(qparams, "nf4")
    adapted = jpeft.apply(params, "lora", key=jax.random.key(0), r=2)
    with pytest.raises(ValueError, match=r"'model/layers_0/self_attn/k_proj/kernel' is adapted \(lora\); quantize the base first"):
        jpeft.quantize(adapted, "nf4", targets=r".*k_proj/kernel")
    with pytest.raises(TypeError, match=r"'ids' has dtype int32"):
        jpeft.quantize({"ids": jnp.zeros((64, 64), jnp.int32)}, "nf4", targets="ids")
    with pytest.raises(ValueError, match=r"also_train matches quantized kernels"):
        jpeft.apply(qparams, "lora", key=jax.random.key(0), also_train=r".*fc2/kernel")


def test_training_over_nf4_lowers_the_loss_like_float32_and_resumes_bit_identically(tmp_path):
    from jpeft import data, train
    from transformers import PhiConfig

    cfg = PhiConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, partial_rotary_factor=0.5, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    config = train.TrainConfig(learning_rate=1e-2, warmup_steps=2, batch_size=4, max_length=48, compute_dtype="float32")
    model, params = phi.init(cfg, jax.random.key(0))
    examples = data.load_task("piqa", "train", path=data.sample_path("piqa", "train"))
    encoded = data.encode_pairs(data.training_pairs(examples), data.default_tokenizer(), config.max_length)
    kwargs = dict(max_steps=12, log_every=1, checkpoint_every=2, progress=False)
    curves = {}
    for kind in (None, "nf4"):
        base = params if kind is None else jpeft.quantize(params, kind)
        # random base weights: adapt every kernel (lm_head, not quantized, included) so the output can move
        adapted = jpeft.apply(base, "lora", key=jax.random.key(1), targets=r".*/kernel", r=4, dropout=0.0)
        trained, records = train.fit(model, adapted, encoded, config, str(tmp_path / str(kind)), **kwargs)
        curves[kind] = np.array([r["loss"] for r in records])
    start, end = curves[None][:3].mean(), curves[None][-3:].mean()
    assert end < start - 0.5
    # same seed, same data: the 4-bit base starts within 2 % of the float32 loss and falls as far (within 10 %)
    assert abs(curves["nf4"][0] - curves[None][0]) <= 0.02 * curves[None][0]
    assert abs((curves["nf4"][:3].mean() - curves["nf4"][-3:].mean()) - (start - end)) <= 0.1 * (start - end)
    _, first = train.fit(model, adapted, encoded, config, str(tmp_path / "resumed"), stop_at=8, **kwargs)
    resumed, rest = train.fit(model, adapted, encoded, config, str(tmp_path / "resumed"), **kwargs)
    np.testing.assert_array_equal(np.array([r["loss"] for r in first + rest]), curves["nf4"])
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.partition(trained)[0]), jax.tree_util.tree_leaves(jpeft.partition(resumed)[0])):
        np.testing.assert_array_equal(a, b)
    assert jpeft.is_quantized(resumed["model"]["layers_0"]["mlp"]["fc1"]["kernel"].frozen["kernel"])


def test_from_pretrained_quantizes_while_loading(tmp_path):
    from transformers import PhiConfig, PhiForCausalLM
    import torch

    torch.manual_seed(0)
    PhiForCausalLM(PhiConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64)).save_pretrained(tmp_path)
    _, loaded = phi.from_pretrained(tmp_path, quantize="nf4")
    _, plain = phi.from_pretrained(tmp_path)
    expected = jpeft.quantize(plain, "nf4")
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(expected)
    with pytest.raises(ValueError, match=r"block_size=48 does not divide"):
        phi.from_pretrained(tmp_path, quantize="nf4", block_size=48)


def test_compiled_step_memory_drops_by_the_frozen_bytes():
    """XLA's memory of the compiled LoRA step (small Phi, 4 x 128, bf16) over an nf4 base is
    below the bf16 step's by at least the difference of the frozen weights' bytes minus 10 %
    (compile only; experiments/PERF.md has the Phi-1.5 16 x 256 figures)."""
    from jpeft import bench, report

    cfg = bench.BenchConfig(model="small", batch=4, seq_len=128, methods=("lora",), compile_only=True, quantize="nf4")
    both = bench.BenchConfig(methods=("lora", "oft"), quantize="nf4")
    assert bench.jobs(both, False, ()) == [("jpeft", "lora"), ("jpeft", "oft"), ("jpeft-nf4", "lora"), ("jpeft-nf4", "oft")]
    with pytest.raises(ValueError, match=r"quantize must be one of \('nf4', 'fp4', 'int8'\), got 'q4'"):
        bench.BenchConfig(quantize="q4")
    plain, quantized = (bench.run_jpeft(cfg, "lora", route)["memory_estimate_gib"] * 2**30 for route in ("jpeft", "jpeft-nf4"))
    shapes = jax.eval_shape(lambda k: phi.init(phi.config("small"), k, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)[1],
                            jax.random.key(0))
    m = report.quantized_memory(shapes, "nf4")
    saved = 2 * m["quantized_params"] - m["quantized_bytes"]
    assert plain - quantized >= 0.9 * saved, (plain, quantized, saved)


def test_cli_train_count_with_quantize(tmp_path, capsys):
    """`jpeft train --quantize nf4` records the kind in run.json, trains over the quantized base
    (its checkpoints and adapter hold the trainable arrays only), and `jpeft eval --quantize`
    reloads the adapter onto it; `jpeft count --quantize` reports the bytes per parameter."""
    import json

    from safetensors.numpy import load_file

    from jpeft import cli

    args = ["--model", "tiny", "--method", "lora", "--tasks", "piqa", "--batch-size", "2", "--dtype", "float32",
            "--max-length", "64", "--limit", "4", "--quantize", "nf4"]
    cli.main(["train", *args, "--run-dir", str(tmp_path / "run"), "--steps", "2", "--warmup-steps", "1"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["quantize"] == "nf4"
    adapter = load_file(tmp_path / "run" / "adapter" / checkpoint.ADAPTER_WEIGHTS)
    assert adapter and all("::trainable::" in k for k in adapter)
    trained = json.loads((tmp_path / "run" / "results" / "piqa.json").read_text())
    cli.main(["eval", *args, "--adapter", str(tmp_path / "run" / "adapter"), "--run-dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "results" / "piqa.json").read_text())["predictions"] == trained["predictions"]
    capsys.readouterr()
    cli.main(["count", "--quantize", "nf4", "--dtype", "bfloat16", "--methods", "lora"])
    out = capsys.readouterr().out
    assert "quantized kernels: 1,207,959,552 parameters in 594.3 MiB (0.516 bytes each)" in out
    assert "| 2,705.1 | 2.000 |" not in out and "| 995.4 | 0.736 |" in out
