"""Adapter export: dtypes follow the base, SHOFT stores no more than its base, N-D,
stacked and fully trained leaves round-trip."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint
from conftest import perturb, rel_err


@pytest.fixture(scope="module")
def base():
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "attn": {"query": {"kernel": jax.random.normal(keys[0], (32, 4, 8)) / 6, "bias": jnp.zeros((4, 8))}},
        "mlp": {"kernel": jax.random.normal(keys[1], (32, 32)) / 6, "bias": jnp.zeros(32)},
        "stack": {"kernel": jax.random.normal(keys[2], (3, 32, 32)) / 6},
    }


LAYOUT = {r"attn/query/kernel": "ioo", r"stack/kernel": "sio"}


@pytest.mark.parametrize("method,hp", [("lora", dict(r=4)), ("shoft", dict(r_u=2, r_v=3)), ("rhoft", dict(k=8, r_u=2, r_v=2))])
def test_round_trip_with_layouts_stacks_and_extra_leaves(base, tmp_path, method, hp):
    adapted = perturb(jpeft.apply(base, method, key=jax.random.key(1), targets=r".*kernel", layout=LAYOUT,
                                  also_train=r"mlp/bias", **hp), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    restored = checkpoint.load_adapter(tmp_path, base)
    assert jax.tree_util.tree_structure(restored, is_leaf=jpeft.is_node) == jax.tree_util.tree_structure(adapted, is_leaf=jpeft.is_node)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.materialize(adapted)), jax.tree_util.tree_leaves(jpeft.materialize(restored))):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_shoft_adapter_is_smaller_than_its_base(base, tmp_path):
    """SHOFT's u, v (2x a square base) are rebuilt from the base, not stored; the saved
    singular values refuse a different base."""
    params = {"mlp": base["mlp"]}
    adapted = perturb(jpeft.apply(params, "shoft", key=jax.random.key(1), targets="mlp/kernel", r_u=2, r_v=2), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    stored = os.path.getsize(tmp_path / "adapter.safetensors")
    assert stored < params["mlp"]["kernel"].nbytes  # 32*32*4 = 4096 bytes of base
    assert stored < 0.5 * jnp.asarray(adapted["mlp"]["kernel"].frozen["u"]).nbytes * 2
    restored = checkpoint.load_adapter(tmp_path, params)
    assert rel_err(jpeft.materialize(restored)["mlp"]["kernel"], jpeft.materialize(adapted)["mlp"]["kernel"]) <= 1e-5
    other = {"mlp": {"kernel": params["mlp"]["kernel"] * 1.01, "bias": params["mlp"]["bias"]}}
    with pytest.raises(ValueError, match=r"'mlp/kernel' was trained on another base: its sigma0"):
        checkpoint.load_adapter(tmp_path, other)


@pytest.mark.parametrize("method,hp", [("lora", dict(r=4)), ("shoft", dict(r_u=2, r_v=2)), ("rhoft", dict(k=8))])
def test_loaded_onto_a_bf16_base_materializes_bf16(base, tmp_path, method, hp):
    params = {"mlp": base["mlp"]}
    adapted = perturb(jpeft.apply(params, method, key=jax.random.key(1), targets="mlp/kernel", **hp), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    restored = checkpoint.load_adapter(tmp_path, bf16)
    node = restored["mlp"]["kernel"]
    assert node.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(node.trainable))  # trained in float32
    merged = jpeft.materialize(restored)["mlp"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    reference = jpeft.materialize(adapted)["mlp"]["kernel"]
    assert rel_err(merged.astype(jnp.float32), reference) < 2e-2  # bf16 base: ~3 significant digits
