"""Checks on 8 host CPU devices, run by tests/test_sharding.py in a subprocess (the device
count is fixed when JAX starts): ``python tests/multidevice.py``; prints ``OK`` after each
of its two checks.

The model: a 1-layer Phi whose every kernel has at least 2**14 elements (FSDP's default
``min_size``), adapted with LoRA on Q, OFT on the attention output (row-parallel under
``tp``), RHOFT on fc1 (column-parallel) and DoRA on fc2 (row-parallel): one tree, so one
compile per mesh covers the four methods.
"""

import os
import shutil
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from transformers import PhiConfig  # noqa: E402

import jpeft  # noqa: E402
from jpeft import checkpoint, data, pipeline, sharding, train  # noqa: E402
from jpeft.models import phi  # noqa: E402

CONFIG = PhiConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=1,
                   num_attention_heads=4, max_position_embeddings=64)
MESHES = {"one device": None, "data=2,fsdp=4": "data=2,fsdp=4", "data=2,fsdp=2,tp=2": "data=2,fsdp=2,tp=2",
          "jax.make_mesh data=2,fsdp=4 (Explicit axes)": ((2, 4), ("data", "fsdp"))}
TC = train.TrainConfig(batch_size=8, compute_dtype="float32", warmup_steps=1, max_length=48, learning_rate=1e-3)


def mesh_of(spec):
    if isinstance(spec, tuple):  # the standard JAX way, its axes Explicit by default
        mesh = jax.make_mesh(*spec)
        assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}, mesh.axis_types
        return mesh
    return sharding.make_mesh(devices=jax.devices()[:1]) if spec is None else sharding.make_mesh(spec)


def adapted_model():
    """The model and its adapted parameters, built in one jitted function (eagerly, each
    method's init would compile op by op: several times slower)."""
    model = phi.make_model(CONFIG)

    def build(key):
        params = model.init(key, np.zeros((1, 1), np.int32))["params"]
        tree = jpeft.apply(params, "lora", key=key, targets=[r".*q_proj/kernel"], r=4, dropout=0.0)
        tree = jpeft.apply(tree, "oft", key=key, targets=[r".*dense/kernel"], block_size=16)
        tree = jpeft.apply(tree, "rhoft", key=key, targets=[r".*fc1/kernel"])
        tree = jpeft.apply(tree, "dora", key=key, targets=[r".*fc2/kernel"], r=4, dropout=0.0)
        # every trainable away from its identity init, so every one has a gradient
        trainable, frozen = jpeft.partition(tree)
        leaves, treedef = jax.tree_util.tree_flatten(trainable)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        leaves = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return jpeft.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)

    return model, jax.jit(build)(jax.random.key(0))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def steps(model, adapted) -> None:
    """One training step on each mesh equals the single-device step; FSDP shards hold 1/4."""
    assert jax.device_count() == 8
    trainable, frozen = jpeft.partition(adapted)
    ids = np.random.RandomState(0).randint(1, CONFIG.vocab_size, (8, 32)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": np.roll(ids, -1, 1),
             "loss_mask": (np.arange(32) >= 8).astype(np.float32)[None].repeat(8, 0)}
    # gradient descent whose state keeps the update it made: the update read as it is (Adam's
    # first step would flatten it to lr * sign(gradient); new - old weights would round it
    # to the weights' float32 spacing)
    tx = optax.GradientTransformation(
        lambda params: jax.tree_util.tree_map(np.zeros_like, params),
        lambda grads, _, params=None: (jax.tree_util.tree_map(lambda g: -0.1 * g, grads),) * 2)
    results = {}
    for name, spec in MESHES.items():
        mesh = mesh_of(spec)
        state = train.init_state(trainable, tx, 0)
        shardings = train.step_shardings(state, frozen, mesh)
        state, placed = sharding.place(state, shardings[0]), sharding.place(frozen, shardings[1])
        if isinstance(spec, str):  # what each device holds of every frozen kernel
            fsdp, tp = mesh.shape["fsdp"], mesh.shape.get("tp", 1)
            kernels = [(p, n, d) for p, n, d in sharding.shard_counts(placed) if p.endswith("kernel") or "frozen/u" in p]
            # q (LoRA's node), k, v, dense (OFT's), fc2 (DoRA's), fc1's RHOFT u; lm_head
            assert len(kernels) == 6 + 1, kernels
            for path, n, per_device in kernels:
                parts = fsdp * (tp if "_proj" in path or "dense" in path or "fc2" in path else 1)
                assert per_device * parts == n, f"{name}: {path} holds {per_device} of {n} elements on a device"
            print(f"{name}: every frozen kernel holds 1/{fsdp * tp} per device (1/{fsdp} outside tensor-parallel layers)")
        step = train.make_train_step(train.lm_loss_fn(model), tx, 1, shardings=shardings)
        t0 = time.perf_counter()
        state, metrics = step(state, placed, sharding.place(batch, shardings[2]))
        updates = jax.tree_util.tree_map(np.asarray, state.opt_state)
        results[name] = ({k: float(metrics[k]) for k in ("loss", "grad_norm")}, updates)
        print(f"{name}: compiled and ran in {time.perf_counter() - t0:.1f} s")
    first, updates0 = results["one device"]
    for name in MESHES:
        metrics, updates = results[name]
        worst = max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(updates0)))
        errors = {k: abs(metrics[k] - first[k]) / abs(first[k]) for k in metrics}
        print(f"{name}: loss {metrics['loss']:.7f}, relative to one device: loss {errors['loss']:.1e}, "
              f"gradient norm {errors['grad_norm']:.1e}, worst trainable update {worst:.1e}")
        assert max(errors.values()) <= 1e-5 and worst <= 1e-5, (name, errors, worst)
    own_jit_on_an_explicit_mesh(model, adapted, batch)
    print("OK")


def own_jit_on_an_explicit_mesh(model, adapted, batch) -> None:
    """A user's own ``jax.jit(jax.value_and_grad(loss))`` over a tree placed by ``fsdp_specs``
    on ``jax.make_mesh``'s mesh (Explicit axes) equals one device; inside ``jax.set_mesh`` of
    that mesh jpeft refuses, naming the axis types, before JAX fails on the lookup."""
    trainable, frozen = jpeft.partition(adapted)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))

    def loss(t, f, ids):
        logits = model.apply({"params": jpeft.combine(t, f)}, ids)
        return jax.numpy.mean(train.target_logprobs(logits, jax.numpy.roll(ids, -1, 1)))

    placed = sharding.place(frozen, sharding.fsdp_specs(frozen, mesh))
    ids = sharding.place(batch["input_ids"], sharding.data_spec(mesh))
    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, placed, ids)
    value0, grads0 = jax.jit(jax.value_and_grad(loss))(trainable, frozen, batch["input_ids"])
    worst = max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)))
    assert abs(float(value) - float(value0)) <= 1e-5 * abs(float(value0)) and worst <= 1e-5, (value, value0, worst)
    print(f"own jit on jax.make_mesh's Explicit mesh: loss relative to one device {abs(value - value0) / abs(value0):.1e}, "
          f"worst gradient {worst:.1e}")
    with jax.set_mesh(mesh):
        try:
            sharding.fsdp_specs(frozen, mesh)
        except ValueError as e:
            assert "Explicit axes (data: Explicit, fsdp: Explicit)" in str(e) and "AxisType.Auto" in str(e), e
        else:
            raise AssertionError("fsdp_specs inside jax.set_mesh of an Explicit mesh was not refused")


def checkpoint_moves(model, adapted) -> None:
    """A checkpoint written on data=2,fsdp=4 restores on data=8 (``jax.make_mesh``'s, Explicit
    axes) and on one device with
    bit-identical arrays, placed on the new mesh, in ``Checkpointer.restore`` and in
    ``train.fit`` resuming from it."""
    pairs = pipeline.training_pairs(pipeline.RunConfig())
    encoded = data.encode_pairs(pairs, data.default_tokenizer(), TC.max_length)
    root = tempfile.mkdtemp()
    try:
        written = os.path.join(root, "fsdp")
        kw = dict(max_steps=5, stop_at=2, checkpoint_every=100, log_every=1, progress=False)
        train.fit(model, adapted, encoded, TC, written, mesh=mesh_of("data=2,fsdp=4"), **kw)
        trainable, frozen = jpeft.partition(adapted)
        tx = train.optimizer(TC, 5)
        saver = checkpoint.Checkpointer(os.path.join(written, "checkpoints"))
        saved, _ = saver.restore(train.init_state(trainable, tx, TC.seed))  # on the host's default device
        saved = jax.tree_util.tree_map(np.asarray, saved)
        assert int(saved.step) == 2
        for name, spec in (("jax.make_mesh data=8 (Explicit axes)", ((8,), ("data",))), ("one device", None)):
            mesh = mesh_of(spec)
            template = train.init_state(trainable, tx, TC.seed)
            template = sharding.place(template, train.step_shardings(template, frozen, mesh)[0])
            restored, _ = saver.restore(template)
            for (path, a), t, b in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                       jax.tree_util.tree_leaves(template), jax.tree_util.tree_leaves(saved)):
                assert a.sharding == t.sharding, path
                np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"{name}: {path}")
            run = os.path.join(root, name)
            shutil.copytree(written, run)
            resumed, _ = train.fit(model, adapted, encoded, TC, run, mesh=mesh, **kw)  # resumes at 2, the end
            for a, b in zip(jax.tree_util.tree_leaves(jpeft.partition(resumed)[0]), jax.tree_util.tree_leaves(saved.trainable)):
                np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
            print(f"{name}: the data=2,fsdp=4 checkpoint restored and resumed bit-identical")
        saver.close()
        print("OK")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    MODEL = adapted_model()
    steps(*MODEL)
    checkpoint_moves(*MODEL)
