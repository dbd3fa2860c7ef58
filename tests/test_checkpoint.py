"""Adapter export: dtypes follow the base, SHOFT stores no more than its base, N-D,
stacked and fully trained leaves round-trip."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint
from jpeft.methods import BUILTIN, shoft
from safetensors.numpy import load_file, save_file
from conftest import decaying_matrix, perturb, rel_err


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


def tensor_names(directory):
    return set(load_file(os.path.join(directory, checkpoint.ADAPTER_WEIGHTS)))


def test_shoft_adapter_is_smaller_than_its_base(base, tmp_path):
    """SHOFT's u, v (2x a square base) are rebuilt from the base, not stored; the saved
    singular values refuse a different base."""
    params = {"mlp": base["mlp"]}
    adapted = perturb(jpeft.apply(params, "shoft", key=jax.random.key(1), targets="mlp/kernel", r_u=2, r_v=2), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    assert tensor_names(tmp_path) == {f"mlp/kernel::trainable::{k}" for k in ("w_u", "w_v", "sigma")} | {"mlp/kernel::frozen::sigma0"}
    stored = os.path.getsize(tmp_path / checkpoint.ADAPTER_WEIGHTS)
    # (2 + 2 + 1 + 1) * 32 float32 = 768 bytes of tensors plus the header, against 4096 bytes
    # of base kernel and 8192 bytes of u, v (what the adapter stored before)
    assert stored < 1500 < params["mlp"]["kernel"].nbytes
    node = adapted["mlp"]["kernel"]
    assert node.frozen["u"].nbytes + node.frozen["v"].nbytes == 8192
    restored = checkpoint.load_adapter(tmp_path, params)
    assert rel_err(jpeft.materialize(restored)["mlp"]["kernel"], jpeft.materialize(adapted)["mlp"]["kernel"]) <= 1e-5
    other = {"mlp": {"kernel": params["mlp"]["kernel"] * 1.01, "bias": params["mlp"]["bias"]}}
    with pytest.raises(ValueError, match=r"'mlp/kernel' was trained on another base: its sigma0 .* differs from the "
                                         r"saved one by 0\.01 of its largest entry, more than the tolerance 0\.0001"):
        checkpoint.load_adapter(tmp_path, other)
    another = {"mlp": {"kernel": base["stack"]["kernel"][0], "bias": params["mlp"]["bias"]}}  # same shape, other weights
    with pytest.raises(ValueError, match=r"'mlp/kernel' was trained on another base"):
        checkpoint.load_adapter(tmp_path, another)


@pytest.mark.parametrize("pattern", ["banded", "random"])
def test_svft_adapter_stores_key_drawn_positions_exactly(base, tmp_path, pattern):
    """SVFT stores its coefficients and singular values (u, v are rebuilt); the random
    pattern's key-drawn positions too, as int32, and gets them back exactly (banded
    positions follow from p and d). Layer l of a stack draws its own positions."""
    targets, hp = r"(mlp|stack)/kernel", dict(pattern=pattern, d=2)
    adapted = perturb(jpeft.apply(base, "svft", key=jax.random.key(1), targets=targets, layout=LAYOUT, **hp), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    stored = load_file(os.path.join(tmp_path, checkpoint.ADAPTER_WEIGHTS))
    positions = ("rows", "cols") if pattern == "random" else ()
    for path in ("mlp/kernel", "stack/kernel"):
        assert {k.split("::", 1)[1] for k in stored if k.startswith(path)} == (
            {"trainable::m", "frozen::sigma0"} | {f"frozen::{k}" for k in positions})
    restored = checkpoint.load_adapter(tmp_path, base)
    for name in positions:
        saved = stored[f"stack/kernel::frozen::{name}"]
        assert saved.dtype == np.int32 and saved.shape == (3, 154) and not np.array_equal(saved[0], saved[1])
        for path in ("mlp", "stack"):
            node = restored[path]["kernel"]
            assert node.frozen[name].dtype == jnp.int32
            np.testing.assert_array_equal(node.frozen[name], adapted[path]["kernel"].frozen[name])
    for path in ("mlp", "stack"):
        merged = jpeft.materialize(restored)[path]["kernel"]
        assert rel_err(merged, jpeft.materialize(adapted)[path]["kernel"]) < 1e-6


@pytest.mark.parametrize("method,hp", [("lora", dict(r=4)), ("dora", dict(r=4)), ("lokr", dict(r=2)),
                                       ("oft", dict(block_size=8)), ("boft", dict(block_size=4, n_butterfly=2)),
                                       ("hra", dict(r=4))])
def test_methods_that_keep_the_base_kernel_store_no_frozen_array(base, tmp_path, method, hp):
    kernel = base["mlp"]["kernel"]
    assert BUILTIN[method].frozen_from_base(kernel, None)["kernel"] is kernel
    adapted = perturb(jpeft.apply({"mlp": base["mlp"]}, method, key=jax.random.key(1), targets="mlp/kernel", **hp), jax.random.key(2))
    checkpoint.save_adapter(tmp_path, adapted)
    assert not [n for n in tensor_names(tmp_path) if "::frozen::" in n]
    restored = checkpoint.load_adapter(tmp_path, {"mlp": base["mlp"]})
    assert restored["mlp"]["kernel"].frozen["kernel"] is kernel  # the model's array, not a copy
    np.testing.assert_array_equal(jpeft.materialize(restored)["mlp"]["kernel"], jpeft.materialize(adapted)["mlp"]["kernel"])


def test_shoft_init_is_frozen_from_base():
    kernel = jax.random.normal(jax.random.key(3), (24, 16))
    config = shoft.ShoftConfig(r_u=2, r_v=2)
    trainable, frozen = shoft.init(jax.random.key(0), kernel, config)
    rebuilt = shoft.frozen_from_base(kernel, config)
    assert set(frozen) == set(rebuilt) == {"u", "v", "sigma0"}
    for k in frozen:
        np.testing.assert_array_equal(frozen[k], rebuilt[k])
    np.testing.assert_array_equal(trainable["sigma"], frozen["sigma0"])
    assert frozen["u"].shape == (16, 16) and frozen["v"].shape == (24, 16)
    _, bf16 = shoft.init(jax.random.key(0), kernel.astype(jnp.bfloat16), config)
    assert trainable["sigma"].dtype == jnp.float32 and all(x.dtype == jnp.bfloat16 for x in bf16.values())
    # a flipped singular pair (column j of both u and v) leaves K' unchanged
    node = jpeft.apply({"k": kernel}, "shoft", key=jax.random.key(0), targets="k", r_u=2, r_v=2)["k"]
    node = perturb({"k": node}, jax.random.key(1))["k"]
    sign = jnp.ones(16).at[jnp.array([0, 5])].set(-1)
    flipped = node.replace(frozen={**node.frozen, "u": node.frozen["u"] * sign, "v": node.frozen["v"] * sign})
    assert rel_err(shoft.materialize(flipped), shoft.materialize(node)) < 1e-6


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
    # frozen arrays were in the kernel's dtype: they follow the base (SHOFT's rebuilt u, v,
    # sigma0, RHOFT's stored u, v), as jpeft.apply on the bf16 base would make them
    assert node.frozen and all(x.dtype == jnp.bfloat16 for x in node.frozen.values())
    merged = jpeft.materialize(restored)["mlp"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    reference = jpeft.materialize(adapted)["mlp"]["kernel"]
    # bf16 keeps 8 significant bits: the cast base alone is off by 1.6e-3 (relative norm);
    # the merged kernels measure 1.7e-3 (lora), 4.2e-3 (shoft: bf16 u, v), 2.7e-3 (rhoft)
    assert rel_err(merged.astype(jnp.float32), reference) < 1e-2


@pytest.mark.parametrize("save_dtype,load_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_shoft_base_check_accepts_the_same_base_in_another_dtype(tmp_path, save_dtype, load_dtype):
    """On a 512 x 512 kernel a bf16 cast moves the smallest singular values by ~4% of
    themselves (an entry-wise check would refuse it) but the largest difference is ~1e-4
    of the largest singular value, well inside the bf16 tolerance 4 * 2**-7."""
    kernel = jax.random.normal(jax.random.key(7), (512, 512)) / np.sqrt(512)
    adapted = perturb(jpeft.apply({"k": kernel.astype(save_dtype)}, "shoft", key=jax.random.key(1), targets="k",
                                  r_u=2, r_v=2), jax.random.key(2), scale=0.01)
    checkpoint.save_adapter(tmp_path, adapted)
    restored = checkpoint.load_adapter(tmp_path, {"k": kernel.astype(load_dtype)})
    assert restored["k"].dtype == load_dtype
    merged = jpeft.materialize(restored)["k"]
    assert merged.dtype == load_dtype
    assert rel_err(merged.astype(jnp.float32), jpeft.materialize(adapted)["k"].astype(jnp.float32)) < 1e-2
    # a kernel with another spectrum is refused in either dtype (two random kernels of one
    # shape share theirs to ~1e-2 at 512 x 512: the check tells them apart in float32 only)
    with pytest.raises(ValueError, match=r"'k' was trained on another base"):
        checkpoint.load_adapter(tmp_path, {"k": decaying_matrix(jax.random.key(8), (512, 512), dtype=load_dtype)})


def save_in_the_previous_format(directory, adapted):
    """What ``save_adapter`` wrote before frozen arrays were rebuilt from the base: every
    frozen array but the kernel, a ``uses_base_kernel`` flag, the saved dtype, no layout."""
    os.makedirs(directory, exist_ok=True)
    tensors, described = {}, {}
    for path, node in ((p, n) for p, n in jpeft.tree.leaves_with_paths(adapted) if jpeft.is_node(n)):
        frozen = {k: v for k, v in node.frozen.items() if k not in ("kernel", "sigma0")}  # SHOFT had no sigma0
        tensors |= {f"{path}::trainable::{k}": np.asarray(v, np.float32) for k, v in node.trainable.items()}
        tensors |= {f"{path}::frozen::{k}": np.asarray(v, np.float32) for k, v in frozen.items()}
        described[path] = {"method": node.method, "hparams": dataclasses.asdict(node.config), "shape": list(node.shape),
                           "dtype": np.dtype(node.dtype).name, "uses_base_kernel": "kernel" in node.frozen,
                           "frozen": {k: np.dtype(v.dtype).name for k, v in frozen.items()}}
    save_file(tensors, os.path.join(directory, checkpoint.ADAPTER_WEIGHTS))
    with open(os.path.join(directory, checkpoint.ADAPTER_CONFIG), "w") as f:
        json.dump(described, f)


@pytest.mark.parametrize("method,hp", [("lora", dict(r=4)), ("shoft", dict(r_u=2, r_v=2)), ("rhoft", dict(k=8))])
def test_adapters_in_the_previous_format_still_load(base, tmp_path, method, hp):
    params = {"mlp": base["mlp"]}
    adapted = perturb(jpeft.apply(params, method, key=jax.random.key(1), targets="mlp/kernel", **hp), jax.random.key(2))
    save_in_the_previous_format(tmp_path, adapted)
    restored = checkpoint.load_adapter(tmp_path, params)
    np.testing.assert_array_equal(jpeft.materialize(restored)["mlp"]["kernel"], jpeft.materialize(adapted)["mlp"]["kernel"])
