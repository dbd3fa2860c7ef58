"""The hook protocol (jpeft.hooks) and how the methods that add computation go through the
rest of jpeft: apply's checks, partition/combine/count, materialize, checkpoints and
adapters, training with resume, the refusals of what cannot hold them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint, hooks, peft_format
from jpeft.models import phi


@pytest.fixture(scope="module")
def tiny():
    return phi.init(phi.config("tiny"), jax.random.key(0))


IDS = np.random.RandomState(0).randint(0, 1000, (2, 9))


def test_model_dims_of_the_phi_port(tiny):
    model, _ = tiny
    dims = hooks.dims_of(model)
    assert (dims.hidden, dims.layers, dims.heads, dims.head_dim, dims.max_positions, dims.vocab_size) == (64, 4, 4, 16, 512, 1024)
    assert dims.points == hooks.POINTS and dims.special_token_ids == (0,)
    assert hooks.dims_of(dims) is dims
    with pytest.raises(TypeError, match="jpeft_dims"):
        hooks.dims_of(object())
    with pytest.raises(ValueError, match=r"unknown hook points \['sideways'\]"):
        dataclasses.replace(dims, points=("sideways",))


def test_apply_places_the_node_and_checks_its_place(tiny):
    model, params = tiny
    adapted = jpeft.apply(params, "prompt_tuning", key=jax.random.key(1), model=model, num_virtual_tokens=3)
    node = adapted["jpeft"]["prompt_tuning"]
    assert node.trainable["embedding"].shape == (3, 64) and adapted["model"] is params["model"]
    with pytest.raises(ValueError, match="pass model="):
        jpeft.apply(params, "prompt_tuning", key=jax.random.key(1))
    with pytest.raises(ValueError, match="targets and layout do not apply"):
        jpeft.apply(params, "prompt_tuning", key=jax.random.key(1), model=model, targets=".*q_proj/kernel")
    lacking = dataclasses.replace(model.jpeft_dims(), points=("residual",))
    with pytest.raises(ValueError, match=r"needs the hook point\(s\) \['embeddings'\], which the model lacks"):
        jpeft.apply(params, "prompt_tuning", key=jax.random.key(1), model=lacking)
    with pytest.raises(ValueError, match="already hold a prompt_tuning node"):
        jpeft.apply(adapted, "prompt_tuning", key=jax.random.key(1), model=model)
    with pytest.raises(ValueError, match="num_virtual_tokens=512 leaves no room"):
        jpeft.apply(params, "prompt_tuning", key=jax.random.key(1), model=model, num_virtual_tokens=512)


def test_tree_functions_treat_the_node_like_any_other(tiny):
    model, params = tiny
    adapted = jpeft.apply(params, "lora", key=jax.random.key(1), r=2)
    adapted = jpeft.apply(adapted, "prompt_tuning", key=jax.random.key(2), model=model, num_virtual_tokens=3)
    counts = jpeft.count_params(adapted)
    lora_only = jpeft.count_params(jpeft.apply(params, "lora", key=jax.random.key(1), r=2))
    assert counts["trainable"] == lora_only["trainable"] + 3 * 64 and counts["frozen"] == lora_only["frozen"]
    trainable, frozen = jpeft.partition(adapted)
    assert trainable["jpeft"]["prompt_tuning"].trainable["embedding"].shape == (3, 64)
    again = jpeft.combine(trainable, frozen)
    np.testing.assert_array_equal(model.apply({"params": again}, IDS), model.apply({"params": adapted}, IDS))
    merged = jpeft.materialize(adapted)  # the kernels merge, the virtual tokens stay
    assert merged["jpeft"]["prompt_tuning"] is adapted["jpeft"]["prompt_tuning"]
    np.testing.assert_allclose(model.apply({"params": merged}, IDS), model.apply({"params": adapted}, IDS), atol=1e-5)


def test_what_cannot_hold_added_computation_says_so(tiny, tmp_path):
    model, params = tiny
    adapted = jpeft.apply(params, "prompt_tuning", key=jax.random.key(1), model=model, num_virtual_tokens=3)
    with pytest.raises(ValueError, match=r"methods that add computation \(\['prompt_tuning'\]\).*jpeft adapter"):
        phi.save_pretrained(jpeft.materialize(adapted), phi.config("tiny"), tmp_path / "merged")
    with pytest.raises(ValueError, match="only a model implementing jpeft.hooks' protocol"):
        jpeft.wrap(model.apply)({"params": adapted}, IDS)
    with pytest.raises(ValueError, match="prompt_tuning"):
        peft_format.check(adapted)
    with pytest.raises(ValueError, match="start=True for the prompt"):
        model.apply({"params": adapted}, IDS, cache=phi.init_cache(model, 2, 16))


def test_adapter_round_trip_and_its_checks(tiny, tmp_path):
    model, params = tiny
    adapted = jpeft.apply(params, "lora", key=jax.random.key(1), r=2)
    adapted = jpeft.apply(adapted, "prompt_tuning", key=jax.random.key(2), model=model, num_virtual_tokens=3)
    checkpoint.save_adapter(tmp_path / "a", adapted)
    loaded = checkpoint.load_adapter(tmp_path / "a", params, model=model)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.partition(loaded)[0]), jax.tree_util.tree_leaves(jpeft.partition(adapted)[0])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.apply({"params": loaded}, IDS), model.apply({"params": adapted}, IDS))
    with pytest.raises(ValueError, match="already in the parameters"):
        checkpoint.load_adapter(tmp_path / "a", loaded)
    other = phi.make_model(dict(phi.NAMED_CONFIGS["tiny"], hidden_size=32, model_type="phi"))
    with pytest.raises(ValueError, match=r"holds trainable arrays \{'embedding': \(3, 64\)\}; this model needs \{'embedding': \(3, 32\)\}"):
        checkpoint.load_adapter(tmp_path / "a", params, model=other)


# Two trees hold every method that adds computation between them (each hook point that
# only one method may use, once per tree), with a kernel method beside them; training one
# tree is one compile, its stop-and-resume two more.
TREES = {
    "prompt+prefix+adapter+loreft+pasta": [
        ("lora", dict(r=2, dropout=0.0)), ("prompt_tuning", dict(num_virtual_tokens=3)),
        ("prefix_tuning", dict(num_virtual_tokens=2, projection=True, encoder_hidden_size=8)),
        ("adapter", dict(kind="houlsby", reduction_factor=8)), ("loreft", dict(rank=2)),
        # the prompts' line breaks (id 199) as PaSTA's special tokens: end-of-text only ends answers
        ("pasta", dict(token_ids=(199,), num_special=2, init_std=0.02)),
    ],
    # AdaMix routes by the training key: the resumed run must draw the same routes
    "p_tuning+adamix": [("p_tuning", dict(num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=8)),
                        ("adamix", dict(num_experts=2, reduction_factor=8))],
}


def _adapted(params, model, methods):
    for i, (method, hp) in enumerate(methods):
        place = {"model": model} if jpeft.methods[method].scope == "model" else {}
        params = jpeft.apply(params, method, key=jax.random.key(10 + i), **place, **hp)
    return params


@pytest.mark.parametrize("tree", sorted(TREES))
def test_training_resumes_bit_identically_and_exports(tiny, tmp_path, tree):
    from jpeft import data, train

    # two layers: every hook runs in each, at half the compile time of the 4-layer tiny Phi
    model, params = phi.init(dict(phi.NAMED_CONFIGS["tiny"], num_hidden_layers=2, model_type="phi"), jax.random.key(0))
    adapted = _adapted(params, model, TREES[tree])
    tok = data.default_tokenizer()
    examples = data.load_task("piqa", "train", path=data.sample_path("piqa", "train"))
    config = train.TrainConfig(learning_rate=1e-2, warmup_steps=1, batch_size=4, max_length=40, compute_dtype="float32")
    encoded = data.encode_pairs(data.training_pairs(examples), tok, config.max_length)
    kwargs = dict(max_steps=5, log_every=1, checkpoint_every=2, progress=False)
    full, full_log = train.fit(model, adapted, encoded, config, str(tmp_path / "a"), **kwargs)
    _, first = train.fit(model, adapted, encoded, config, str(tmp_path / "b"), stop_at=3, **kwargs)
    resumed, rest = train.fit(model, adapted, encoded, config, str(tmp_path / "b"), **kwargs)
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in full_log]
    assert full_log[-1]["loss"] < full_log[0]["loss"]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jpeft.partition(full)[0]),
                            jax.tree_util.tree_leaves(jpeft.partition(resumed)[0])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    start = jax.tree_util.tree_leaves_with_path(jpeft.partition(adapted)[0]["jpeft"])
    moved = jax.tree_util.tree_leaves(jpeft.partition(full)[0]["jpeft"])
    unmoved = [jax.tree_util.keystr(p) for (p, a), b in zip(start, moved) if np.array_equal(a, b)]
    assert not unmoved  # every added array trained
    loaded = checkpoint.load_adapter(tmp_path / "a" / "adapter", params, model=model)
    # fit returns host (NumPy) arrays: on device, as loaded ones, every product runs in XLA
    np.testing.assert_array_equal(model.apply({"params": loaded}, IDS), model.apply({"params": jax.device_put(full)}, IDS))
