"""Every registered method on the Llama port: it adapts a tiny Llama and takes a training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import jpeft
from jpeft.methods import BUILTIN
from jpeft.models import llama
from conftest import SMALL_HPARAMS

VOCAB = 97


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(3, VOCAB, (3, 11))


@pytest.fixture(scope="module")
def biased():
    """A tiny Llama with every bias (BitFit has something to train), GQA and tied embeddings."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    return llama.init(cfg, jax.random.key(0))


@pytest.mark.parametrize("method", list(BUILTIN))
def test_every_method_takes_a_training_step(biased, ids, method):
    model, params = biased
    hparams = SMALL_HPARAMS.get(method, {})
    targets = r".*/(q_proj|k_proj|v_proj)/kernel" if method != "bitfit" else None
    adapted = jpeft.apply(params, method, key=jax.random.key(1), **hparams,
                          **jpeft.core.targets_for(method, targets, model))
    trainable, frozen = jpeft.partition(adapted)
    x = jnp.asarray(ids).at[:, 0].set(1)  # a BOS: PaSTA trains the special tokens' representations

    def loss_fn(t):
        logits = model.apply({"params": jpeft.combine(t, frozen)}, x[:, :-1], deterministic=False,
                             rngs={"dropout": jax.random.key(2)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(t):  # one compile: loss, gradient, Adam's update and how far it moved the trainables
        opt = optax.adam(1e-2)
        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, _ = opt.update(grads, opt.init(t), t)
        stepped = optax.apply_updates(t, updates)
        return loss, jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), stepped, t))

    loss, moved = step(trainable)
    assert np.isfinite(float(loss)) and 3.0 < float(loss) < 6.0  # ≈ log(97) at init
    assert moved and max(float(m) for m in moved) > 1e-4


def test_remat_keeps_the_numbers(biased, ids):
    """Rematerialized layers (``remat="full"``) give the same loss and gradients."""
    model, params = biased
    trainable, frozen = jpeft.partition(jpeft.apply(params, "lora", key=jax.random.key(1), r=4))
    trainable = jax.tree_util.tree_map(lambda a: a + 0.01, trainable)
    x = jnp.asarray(ids)

    def loss_fn(t, m):
        logits = m.apply({"params": jpeft.combine(t, frozen)}, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    (plain, g_plain), (remat, g_remat) = (jax.jit(jax.value_and_grad(lambda t: loss_fn(t, m)))(trainable)
                                          for m in (model, model.clone(remat="full")))
    assert abs(float(plain) - float(remat)) <= 1e-6 * abs(float(plain))
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
