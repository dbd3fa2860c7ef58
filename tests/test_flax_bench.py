"""The stock-flax decoder and the benchmark routes that compare jpeft.wrap with the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import bench
from jpeft.models import flax_decoder

TINY = flax_decoder.DecoderConfig(vocab=64, hidden=32, layers=2, heads=4, mlp=64)


@pytest.mark.parametrize("arch", flax_decoder.ARCHS)
def test_decoder_runs_adapted_through_wrap(arch):
    apply_fn, params = flax_decoder.build(arch, TINY, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY.vocab)
    logits = apply_fn(params, ids)
    assert logits.shape == (2, 8, TINY.vocab) and logits.dtype == jnp.float32
    adapted = jpeft.apply(params, "lora", key=jax.random.key(2), targets=list(flax_decoder.TARGETS),
                          layout=flax_decoder.LAYOUT, r=4)
    assert len(jpeft.count_params(adapted)["targets"]) == 6 * TINY.layers
    wrapped = jax.jit(jpeft.wrap(apply_fn))
    np.testing.assert_allclose(wrapped(adapted, ids), logits, rtol=1e-5, atol=1e-5)  # LoRA starts at W
    trainable, frozen = jpeft.partition(adapted)  # moved off the start, wrap still equals the materialized model
    trainable = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), trainable)
    moved = jpeft.combine(trainable, frozen)
    out = wrapped(moved, ids)
    assert not np.allclose(out, logits, atol=1e-3)
    np.testing.assert_allclose(out, apply_fn(jpeft.materialize(moved), ids), rtol=1e-4, atol=1e-5)
    causal = apply_fn(params, ids.at[:, -1].set(0))
    np.testing.assert_allclose(causal[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-5)  # the mask is causal


def test_bench_config_accepts_flax_models_and_refuses_others():
    assert bench.BenchConfig(model="nnx:tiny").model == "nnx:tiny"
    with pytest.raises(ValueError, match=r"model must be one of .*'linen:tiny'.*got 'linen:huge'"):
        bench.BenchConfig(model="linen:huge")
    with pytest.raises(ValueError, match=r"remat applies to jpeft.s ports only"):
        bench.BenchConfig(model="linen:tiny", remat="dots")
    cfg = bench.BenchConfig(model="linen:tiny", methods=("lora", "oft"))
    assert bench.jobs(cfg, False, ()) == [("wrap", "lora"), ("wrap", "oft"), ("materialize", "lora"), ("qwix", "lora"), ("full", "full")]
    assert ("qwix", "lora") in bench.jobs(bench.BenchConfig(model="nnx:tiny"), False, ())
    assert bench.jobs(bench.BenchConfig(model="nnx:tiny", methods=("oft",)), False, ()) == [("wrap", "oft"), ("full", "full")]
    with pytest.raises(ValueError, match=r"qwix route needs targets ending in '/kernel'.*'.\*query/bias'"):
        bench.BenchConfig(model="linen:tiny", methods=("lora",), targets=(".*query/kernel", ".*query/bias"))
    with pytest.raises(ValueError, match=r"--peft compares with jpeft's ports"):
        bench.jobs(cfg, True, ("eager",))


@pytest.mark.parametrize("arch", flax_decoder.ARCHS)
def test_compile_only_routes_rank_as_the_cost_model_says(arch):
    """Wrapped LoRA and qwix's LoRA skip the base's weight gradient; the materialize route
    pays it for the targets and full fine-tuning for every weight (at these tiny sizes
    norms, softmax and the loss are a large share of the step, hence the loose margins)."""
    cfg = bench.BenchConfig(model=f"{arch}:tiny", batch=32, seq_len=128, compile_only=True, compute_dtype="float32",
                            param_dtype="float32", methods=("lora",), hparams={"lora": {"r": 4}})
    runs = {route: bench.run_jpeft(cfg, "full" if route == "full" else "lora", route)
            for route in ("wrap", "materialize", "qwix", "full")}
    flop = {route: r["xla_tflop_per_step"] for route, r in runs.items()}
    assert flop["wrap"] < 0.97 * flop["materialize"] < 0.97 * flop["full"], flop
    assert flop["qwix"] == pytest.approx(flop["wrap"], rel=0.1), flop
    assert runs["qwix"]["trainable"] == runs["wrap"]["trainable"] == runs["materialize"]["trainable"]  # the same adapters
    assert all(r["memory_estimate_gib"] > 0 for r in runs.values())
