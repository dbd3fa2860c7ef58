"""jpeft.sharding: placements (in process, on abstract meshes of any size), and what needs
several devices or processes in subprocesses with time limits: 8 host CPU devices
(tests/multidevice.py) and two processes of 4 devices joined by jax.distributed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import jpeft
from jpeft import cli, sharding

from conftest import toy_params

MESH = AbstractMesh((2, 4, 2), ("data", "fsdp", "tp"))
TESTS = Path(__file__).parent


def specs_by_path(tree, **kw):
    specs = sharding.fsdp_specs(tree, MESH, **kw)
    return {jpeft.tree.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]}


def test_fsdp_specs_split_large_frozen_arrays_on_their_largest_divisible_axis():
    tree = {"embed": jnp.zeros((1001, 64)),  # 1001 is not divisible by 4: the 64 axis is
            "w": jnp.zeros((64, 256)), "small": jnp.zeros((8, 8)), "odd": jnp.zeros((125, 131)),
            "bias": jnp.zeros((256,)), "none": None}
    specs = specs_by_path(tree, min_size=65)
    assert specs == {"embed": P(None, "fsdp"), "w": P(None, "fsdp"), "small": P(None, None), "odd": P(None, None),
                     "bias": P("fsdp")}
    assert sharding.fsdp_specs(tree, MESH)["none"] is None
    # min_size: arrays below it stay whole
    assert specs_by_path(tree, min_size=2**14)["w"] == P(None, "fsdp")
    assert specs_by_path(tree, min_size=2**15)["w"] == P(None, None)
    assert specs_by_path(tree, axis=None, min_size=0)["w"] == P(None, None)


def test_fsdp_specs_replicate_trainables_and_follow_nodes_and_quantized_kernels():
    params = toy_params(jax.random.key(0), hidden=64, mlp=128, layers=1)
    adapted = jpeft.apply(params, "lora", key=jax.random.key(1), targets=[r".*q_proj/kernel", r".*fc1/kernel"], r=4)
    specs = specs_by_path(adapted, min_size=1024, tp_axis="tp")
    q = "model/layers_0/self_attn/q_proj/kernel"
    assert specs[f"{q}/trainable/a"] == P() and specs[f"{q}/trainable/b"] == P()
    # column-parallel: the output axis on tp, fsdp on the input axis; the bias on tp
    assert specs[f"{q}/frozen/kernel"] == P("fsdp", "tp")
    assert specs["model/layers_0/self_attn/q_proj/bias"] == P("tp")
    # row-parallel: the input axis on tp (its bias is whole)
    assert specs["model/layers_0/self_attn/dense/kernel"] == P("tp", "fsdp")
    assert specs["model/layers_0/mlp/fc2/kernel"] == P("tp", "fsdp")
    assert specs["model/layers_0/mlp/fc2/bias"] == P(None)
    # a partitioned half keeps its None leaves; the specs partition like the tree
    trainable, frozen = jpeft.partition(sharding.fsdp_specs(adapted, MESH, min_size=1024))
    assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(jpeft.partition(adapted)[1])
    assert all(s.spec == P() for s in jax.tree_util.tree_leaves(trainable))
    # quantized kernels: their packed codes split by size
    quantized = jpeft.quantize(params, "nf4")
    specs = specs_by_path(quantized, min_size=1024)
    codes = [s for p, s in specs.items() if p.endswith("fc1/kernel/parts/codes")]
    assert codes == [P("fsdp")], specs


def test_llama_port_placements_follow_the_hugging_face_names():
    """The tensor-parallel rules read the Llama port's names unchanged: q/k/v, gate and up
    split by output features, o_proj and down_proj by input features (SmolLM2-135M's shapes)."""
    from jpeft.models import llama

    shapes = llama.param_shapes(llama.make_model(llama.config("smollm2-135m")))
    adapted = jax.eval_shape(lambda p: jpeft.apply(p, "lora", key=jax.random.key(0), r=8), shapes)
    specs = specs_by_path(adapted, tp_axis="tp")
    layer = "model/layers_3"
    assert specs[f"{layer}/self_attn/q_proj/kernel/frozen/kernel"] == P("fsdp", "tp")  # (576, 576)
    assert specs[f"{layer}/self_attn/k_proj/kernel/frozen/kernel"] == P("fsdp", "tp")  # (576, 192)
    assert specs[f"{layer}/self_attn/q_proj/kernel/trainable/a"] == P()
    assert specs[f"{layer}/self_attn/o_proj/kernel"] == P("tp", "fsdp")
    assert specs[f"{layer}/mlp/gate_proj/kernel"] == specs[f"{layer}/mlp/up_proj/kernel"] == P("fsdp", "tp")
    assert specs[f"{layer}/mlp/down_proj/kernel"] == P("tp", "fsdp")  # (1536, 576)
    assert specs["model/embed_tokens/embedding"] == P("fsdp", None)  # tied: the one (49152, 576) matrix
    assert specs[f"{layer}/input_layernorm/scale"] == P(None)  # 576 < min_size


def test_meshes_and_batches():
    assert sharding.parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    for bad, message in (("data=2,data=2", "twice"), ("pipe=2", "AXIS one of"), ("data=0", "positive"), ("", "no axis"),
                         ("data", "AXIS=SIZE")):
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh(bad)
    n = jax.device_count()
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": n}
    # axes in data / fsdp / tp order, whatever order they are given in
    assert sharding.make_mesh({"fsdp": 1, "data": n}).axis_names == ("data", "fsdp")
    with pytest.raises(ValueError, match=f"has {2 * n} positions but there are {n} devices"):
        sharding.make_mesh(f"data={2 * n}")
    assert sharding.data_spec(MESH).spec == P(("data", "fsdp"))
    assert sharding.batch_divisor(MESH) == 8
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        sharding.fsdp_specs({}, sharding.make_mesh(), axis="fsdp")
    with pytest.raises(ValueError, match="must differ"):
        sharding.fsdp_specs({}, MESH, axis="tp", tp_axis="tp")
    with pytest.raises(ValueError, match="missing \\['num_processes', 'process_id'\\]"):
        sharding.initialize("localhost:1234")


def test_train_refuses_a_mesh_the_devices_or_the_batch_do_not_fit(tmp_path, capsys):
    n = jax.device_count()
    for mesh, message in ((f"data={n + 1}", "positions but there are"), ("data=1,pipe=2", "AXIS one of")):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--model", "tiny", "--mesh", mesh, "--steps", "1", "--run-dir", str(tmp_path / "run")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:  # a multi-process run must name its (shared) run directory
        cli.main(["train", "--model", "tiny", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"])
    assert e.value.code == 2 and "--run-dir" in capsys.readouterr().err


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1"}


def test_steps_and_checkpoints_on_eight_devices():
    """LoRA, OFT, RHOFT and DoRA: one step on data=2,fsdp=4 and on data=2,fsdp=2,tp=2 equals
    the step on one device (loss and updates <= 1e-5 relative), every frozen kernel split 1/4
    per device; a checkpoint written on data=2,fsdp=4 restores bit-identically on data=8 and
    on one device and training continues from it (tests/multidevice.py)."""
    proc = subprocess.run([sys.executable, str(TESTS / "multidevice.py")], env=_env(8), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0 and proc.stdout.count("OK") == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("restored and resumed bit-identical") == 2 and "holds 1/4 per device" in proc.stdout


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    """The tiny Phi with one layer, as a Hugging Face checkpoint with the bundled tokenizer
    (each process loads it, compiles and steps faster than the 4-layer named one)."""
    from jpeft import data
    from jpeft.models import phi

    directory = tmp_path_factory.mktemp("one-layer")
    config = phi.load_config(dict(phi.NAMED_CONFIGS["tiny"], num_hidden_layers=1, model_type="phi"))
    _, params = phi.init(config, jax.random.key(0))
    phi.save_pretrained(params, config, directory)
    data.default_tokenizer().save_pretrained(directory)
    return str(directory)


def _train(model, run_dir, *, devices: int, process: tuple[int, int] | None = None, stop_at: int | None = None):
    """``jpeft train`` of LoRA on ``model``, on data=2,fsdp=4 (one process of 8 devices, or
    ``process`` = (coordinator port, id) of two with 4 each), a long schedule (stopped at
    ``stop_at`` or killed), logging every step, checkpointing every 2."""
    args = [sys.executable, "-m", "jpeft.cli", "train", "--model", model, "--method", "lora", "--mesh", "data=2,fsdp=4",
            "--steps", "10000", "--batch-size", "8", "--max-length", "64", "--limit", "16", "--dtype", "float32",
            "--log-every", "1", "--checkpoint-every", "2", "--run-dir", str(run_dir)]
    if stop_at is not None:
        args += ["--stop-at", str(stop_at)]
    if process is not None:
        port, pid = process
        args += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid),
                 "--heartbeat-timeout", "10"]
    return subprocess.Popen(args, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run_dir) -> list[float]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line] if path.exists() else []


def _ours(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("[Gloo]"))


def test_two_processes_train_as_one_and_stop_when_one_dies(tmp_path, one_layer_checkpoint):
    """Two processes of 4 CPU devices (jax.distributed on localhost) reach, at step 3, the loss
    of one process of 8 devices, checkpoint together (process 0 writes the log and prints);
    killing one makes the other exit non-zero within 60 s, naming the cause."""
    single = _train(one_layer_checkpoint, tmp_path / "one", devices=8, stop_at=3)
    port = _port()
    pair = [_train(one_layer_checkpoint, tmp_path / "two", devices=4, process=(port, i)) for i in range(2)]
    try:
        _, err = single.communicate(timeout=240)
        assert single.returncode == 0, err[-3000:]
        deadline = time.monotonic() + 240
        while len(_losses(tmp_path / "two")) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in pair), \
                [p.poll() for p in pair] + [_ours(p.stderr.read())[-2000:] for p in pair if p.poll() is not None]
            time.sleep(0.5)
        one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
        assert len(one) == 3 and abs(two[2] - one[2]) <= 1e-5 * abs(one[2]), (one, two)
        saved = [p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()]
        assert saved and all(int(n) % 2 == 0 for n in saved), saved  # written together, every 2 steps
        pair[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, err = pair[0].communicate(timeout=60)
        err = _ours(err)  # (a message may follow a progress bar on its line: tqdm ends none)
        assert time.monotonic() - killed < 60 and pair[0].returncode != 0, (pair[0].returncode, err[-3000:])
        # JAX's coordination service names the dead task; or a collective with it fails first:
        # gloo aborts the process with its error, or jpeft's exit path reports the exception
        causes = ("another task died", "unhealthy", "jpeft: process 0 of 2 stops", "gloo")
        assert any(m in err for m in causes), err[-3000:]
        assert "run directory" in out and _ours(pair[1].communicate()[0]) == ""  # process 1 printed nothing
    finally:
        for p in (single, *pair):
            if p.poll() is None:
                p.kill()
