"""The command line and the scripts, run as a user would (tiny model, bundled data)."""

import gzip
import json
import os
import subprocess
import sys

import jax
import pytest

from jpeft import bench, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_count_phi15_offline(capsys):
    cli.main(["count", "--model", "phi-1.5", "--json"])
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["full fine-tuning"]["trainable"] == 1_418_270_720
    assert rows["lora"]["trainable"] == 4_718_592 and rows["rhoft"]["trainable"] == 4_792_320
    assert rows["oft"]["trainable"] == 4_644_864 and rows["shoft"]["trainable"] == 4_866_048
    assert rows["hra"]["trainable"] == 72 * 16 * 2048  # every built-in method is listed
    # the methods that add computation, placed by the model's hook dimensions
    assert rows["prompt_tuning"]["trainable"] == 40_960 and rows["prefix_tuning"]["trainable"] == 1_966_080
    # RHOFT drops the 72 Q/K/V matrices for rank-1024 factors of the same size
    assert rows["rhoft"]["frozen"] == 1_418_270_720
    cli.main(["count", "--model", "phi-1.5", "--methods", "lora", "--set", "lora.r=8"])
    assert "| lora | r=8, alpha=32.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["count", "--methods", "lorax"])


def test_set_syntax_version_help_and_no_run_dir_on_bad_input(tmp_path, capsys):
    # --set: NAME=VALUE where one method is in play, METHOD.NAME=VALUE everywhere
    assert cli.parse_hparams(["r=8", "lora.alpha=4", "init=\"kaiming\""], ["lora"]) == {
        "lora": {"r": 8, "alpha": 4, "init": "kaiming"}}
    assert cli.parse_hparams(["hra.r=4"], ["shoft"], also=("hra",)) == {"hra": {"r": 4}}
    for items, methods, message in [
        (["r=8"], ["lora", "oft"], r"names no method and 2 are in play \['lora', 'oft'\]: write METHOD.NAME=VALUE"),
        (["oft.block_size=8"], ["lora"], r"is for 'oft', which is not among the methods \['lora'\]"),
        (["r"], ["lora"], r"--set expects NAME=VALUE or METHOD.NAME=VALUE, got 'r'"),
    ]:
        with pytest.raises(ValueError, match=message):
            cli.parse_hparams(items, methods)
    cli.main(["count", "--methods", "lora", "--set", "r=8"])
    assert "| lora | r=8, alpha=32.0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("jpeft 0.")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL" in help_text and "the Phi port (phi-1.5, small, tiny), the Llama port (smollm2-135m," in help_text
    assert "(default: tiny)" in help_text and "hra" in help_text
    # a run refused by validation leaves no run directory behind
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "oft", "--set", "block_size=5", "--steps", "1", "--run-dir", str(run)])
    assert "block_size=5 does not divide" in capsys.readouterr().err and not run.exists()
    for method, setting, message in [("adapter", "reduction_factor=5", "reduction_factor=5 does not divide the model's hidden size 64"),
                                     ("prefix_tuning", "num_virtual_tokens=512", "num_virtual_tokens=512 leaves no room")]:
        with pytest.raises(SystemExit):
            cli.main(["train", "--method", method, "--set", setting, "--steps", "1", "--run-dir", str(run)])
        assert message in capsys.readouterr().err and not run.exists()


def test_train_then_eval_with_the_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--model", "tiny", "--method", "lokr", "--tasks", "piqa", "arc_easy", "--batch-size", "4", "--dtype", "float32",
            "--max-length", "128", "--run-dir", str(run)]
    cli.main(["train", *args, "--steps", "6", "--warmup-steps", "2", "--lr", "1e-2", "--log-every", "2",
              "--merged-out", str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert "piqa" in out and "accuracy" in out
    for path in ("run.json", "log.jsonl", "adapter/adapter_config.json", "results/piqa.json", "results/arc_easy.json",
                 "../merged/config.json", "../merged/model.safetensors"):
        assert (run / path).exists(), path
    trained = json.loads((run / "results" / "piqa.json").read_text())
    assert trained["n"] == len(trained["predictions"]) and 0 <= trained["accuracy"] <= 1
    cli.main(["eval", *args[:-2], "--adapter", str(run / "adapter"), "--run-dir", str(tmp_path / "eval")])
    again = json.loads((tmp_path / "eval" / "results" / "piqa.json").read_text())
    assert again["accuracy"] == trained["accuracy"]  # the adapter export reproduces the trained model


def test_quick_demo_and_the_real_demos_statistics(tmp_path, capsys):
    from jpeft import demo

    cli.main(["demo", "--quick", "--steps", "3", "--run-dir", str(tmp_path / "quick")])
    out = capsys.readouterr().out
    assert out.count("|factored - merged|") == len(cli.DEMO_METHODS) and "| rhoft | r_u=16, r_v=16" in out
    assert (tmp_path / "quick" / "adapter" / "adapter_config.json").exists()
    # the paired standard error of a gain: questions 0-2 turn right, 3 turns wrong, 4-7 stay
    before = [{"prediction": p, "label": 0} for p in (1, 1, 1, 0, 0, 0, 1, 1)]
    after = [{"prediction": p, "label": 0} for p in (0, 0, 0, 1, 0, 0, 1, 1)]
    diff = [1, 1, 1, -1, 0, 0, 0, 0]
    expected = (sum((d - 0.25) ** 2 for d in diff) / 7) ** 0.5 / 8 ** 0.5
    assert abs(demo.paired_standard_error(before, after) - expected) < 1e-12
    cfg = demo.config()
    assert cfg.model == "smollm2-135m" and cfg.template == "harness" and cfg.hparams == {"r": 16, "alpha": 32.0, "dropout": 0.0}
    assert [len(demo.pipeline.load_examples(cfg, "arc_easy", s)) for s in ("train", "validation")] == [2051, 200]


MINI = os.path.join(ROOT, "jpeft", "assets", "sample_data", "commonsense_mini.json")


def test_holdout_and_instruction_sets_on_train_and_eval(tmp_path, capsys, monkeypatch):
    """--holdout carves the evaluation records out of the train split; --eval-instructions
    scores LLM-Adapters files both ways; bad input fails before training; an evaluation that
    fails after training loses nothing that was trained."""
    from jpeft import data, eval as evaluation

    run = tmp_path / "run"
    args = ["--model", "tiny", "--tasks", "arc_easy", "--template", "harness", "--holdout", "6", "--batch-size", "4",
            "--dtype", "float32", "--max-length", "192", "--eval-instructions", MINI]
    cli.main(["train", *args, "--steps", "2", "--warmup-steps", "1", "--run-dir", str(run)])
    assert "commonsense_mini" in capsys.readouterr().out
    task = json.loads((run / "results" / "arc_easy.json").read_text())
    held = data.holdout(data.load_task("arc_easy", "train", path=data.sample_path("arc_easy", "train"),
                                       template="harness"), 6)[1]
    assert task["n"] == 6 and [p["source"] for p in task["predictions"]] == [ex.source for ex in held]
    assert task["template"] == "harness" and "6 held out" in task["split"]
    mini = json.loads((run / "results" / "commonsense_mini.json").read_text())
    assert mini["n"] == 35 and {"accuracy", "accuracy_norm", "accuracy_generate"} <= set(mini)
    assert len(mini["generations"]) == 35 and all(g["label"] for g in mini["generations"])
    # eval on the instruction file alone (no --tasks) gives the same numbers from the adapter
    cli.main(["eval", "--model", "tiny", "--dtype", "float32", "--max-length", "192", "--eval-instructions", MINI,
              "--adapter", str(run / "adapter"), "--run-dir", str(tmp_path / "eval")])
    again = json.loads((tmp_path / "eval" / "results" / "commonsense_mini.json").read_text())
    assert again["accuracy"] == mini["accuracy"] and again["accuracy_generate"] == mini["accuracy_generate"]
    assert not (tmp_path / "eval" / "results" / "piqa.json").exists()
    # bad input: exit 2 before any run directory exists
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "2 + 2?", "input": "", "output": "4", "answer": "4"}]))
    for extra, message in [(["--eval-instructions", str(bad)], "bad.json: record 0: field 'instruction' has no 'Answer format"),
                           (["--template", "lm-eval"], "invalid choice: 'lm-eval'")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["train", *args, *extra, "--steps", "1", "--run-dir", str(tmp_path / "refused")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "refused").exists()
    long = tmp_path / "long.json"  # a choice of ~100 tokens: no room for it in 64
    long.write_text(json.dumps([{"instruction": "Pick.\n\nAnswer format: " + "word " * 100 + "/b", "input": "",
                                 "output": "the correct answer is b", "answer": "b"}]))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", "tiny", "--max-length", "64", "--eval-instructions", str(long)])
    assert exit_.value.code == 2 and "long.json:0, choice 0: the choice is" in capsys.readouterr().err

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        cli.main(["train", *args, "--steps", "2", "--run-dir", str(tmp_path / "kept"), "--peft-out", str(tmp_path / "peft")])
    assert (tmp_path / "kept" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "peft" / "adapter_config.json").exists()


def test_train_export_eval_on_a_llama_checkpoint_directory(tmp_path, capsys):
    """A Llama directory as transformers writes it (model + tokenizer): train, PEFT export,
    merged export, eval; a directory of a model_type jpeft does not port exits 2."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from jpeft import data

    base = tmp_path / "llama"
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(base)
    data.default_tokenizer().save_pretrained(base)
    run = tmp_path / "run"
    args = ["--model", str(base), "--tasks", "arc_easy", "--batch-size", "4", "--dtype", "float32", "--max-length", "128"]
    cli.main(["train", *args, "--method", "lora", "--steps", "4", "--lr", "1e-2", "--warmup-steps", "1",
              "--run-dir", str(run), "--peft-out", str(tmp_path / "peft"), "--merged-out", str(tmp_path / "merged")])
    assert "arc_easy" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft")
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.no_grad():  # the PEFT adapter on the base is the merged model
        torch.testing.assert_close(theirs(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    trained = json.loads((run / "results" / "arc_easy.json").read_text())
    cli.main(["eval", *args, "--adapter", str(run / "adapter"), "--run-dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "results" / "arc_easy.json").read_text())["accuracy"] == trained["accuracy"]
    config = json.loads((base / "config.json").read_text())
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", str(tmp_path / "neox"), "--tasks", "arc_easy"])
    assert exit_.value.code == 2
    assert "model_type 'gpt_neox' is not supported; jpeft ports model_type phi, llama, mistral, qwen2" in (
        capsys.readouterr().err)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", str(damaged), "--tasks", "arc_easy"])
    assert exit_.value.code == 2 and str(damaged) in capsys.readouterr().err


def test_bench_smoke_writes_json_table_and_plot(tmp_path):
    # PEFT has no SHOFT/RHOFT: its Householder method HRA is timed in their place
    assert bench.jobs(bench.BenchConfig(methods=("lora", "rhoft")), True, ("eager",)) == [
        ("jpeft", "lora"), ("jpeft", "rhoft"), ("peft-eager", "lora"), ("peft-eager", "hra")]
    cfg = bench.BenchConfig(model="tiny", batch=2, seq_len=32, methods=("lora",), warmup=1, steps=3,
                            compute_dtype="float32", param_dtype="float32", profile_dir=str(tmp_path / "profile"))
    seen = []
    results = bench.run(cfg, peft=True, peft_modes=("eager",), timeout=300, on_result=lambda so_far: seen.append(len(so_far)))
    assert seen == [1, 2]  # partial results are handed out after every job
    assert [(r["impl"], r["method"]) for r in results] == [("jpeft", "lora"), ("peft-eager", "lora")]
    assert all("error" not in r for r in results), results
    for r in results:
        assert r["step_ms_q1"] <= r["step_ms"] <= r["step_ms_q3"] and len(r["step_ms_all"]) == 3
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["model_tflop_per_step"] > 0
    assert results[0]["x_jpeft_lora"] == 1.0 and results[1]["x_impl_lora"] == 1.0
    assert results[1]["x_jpeft_lora"] == results[1]["step_ms"] / results[0]["step_ms"]
    assert results[1]["trainable"] == results[0]["trainable"]  # the same LoRA on the same modules
    assert results[0]["xla_tflop_per_step"] > 0 and results[0]["memory_estimate_gib"] > 0
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert traces == [f"{run}.trace.json.gz" for run in ("jpeft-lora", "peft-eager-lora")]
    for run in ("jpeft-lora", "peft-eager-lora"):
        with gzip.open(tmp_path / "profile" / f"{run}.trace.json.gz") as f:
            assert any(e.get("ph") == "X" for e in json.load(f)["traceEvents"])  # timed events to look at
    paths = bench.write_outputs(results, cfg, str(tmp_path))
    data = json.load(open(paths["json"]))
    assert data["config"]["model"] == "tiny" and len(data["results"]) == 2
    assert data["environment"]["versions"]["jax"] and data["environment"]["python"]
    table = open(paths["md"]).read()
    assert "| jpeft | lora |" in table and "| peft-eager | lora |" in table
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_compile_only_and_bad_configs(tmp_path, capsys, monkeypatch):
    cli.main(["bench", "--compile-only", "--methods", "lora", "oft", "--batch", "2", "--seq-len", "16",
              "--dtype", "float32", "--param-dtype", "float32", "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / "bench.json"))["results"]
    assert [r["method"] for r in rows] == ["lora", "oft"] and "step_ms" not in rows[0]
    assert rows[0]["x_lora_flop"] == 1.0 and 0.5 < rows[1]["x_lora_flop"] < 2
    assert "| oft |" in (tmp_path / "bench.md").read_text()
    bad = [
        (dict(methods=("lorax",)), "unknown method 'lorax'"),
        (dict(model="phi-2"), "model must be one of"),
        (dict(methods=("lora",), hparams={"lora": {"rank": 4}}), "unknown hyper-parameter"),
        (dict(methods=("lora",), hparams={"oft": {"block_size": 4}}), "not among the methods"),
        (dict(batch=0), "batch must be a positive integer"),
        (dict(remat="all"), "remat must be one of"),
        (dict(compile_only=True, profile_dir="p"), "cannot be combined with compile_only"),
        (dict(model="linen:tiny", methods=("lora", "adapter")), r"\['adapter'\] add computation at a model's hook points"),
        (dict(mesh="data=2,gpu=4"), "each part must be AXIS=SIZE with AXIS one of data, fsdp, tp"),
        (dict(mesh="data=2,data=2"), "names axis 'data' twice"),
        (dict(mesh="data=3", batch=16), r"batch=16 does not split over the 3 data-parallel positions"),
        (dict(model="linen:tiny", mesh="fsdp=2,tp=2"), "a tp axis splits layers by the ports' names"),
    ]
    for kwargs, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            bench.BenchConfig(**kwargs)
    # a job that fails or times out is recorded, reported, and does not stop the others
    cfg = bench.BenchConfig(compile_only=True, methods=("lora",))
    failed = bench._run_job("jpeft", "lora", cfg, timeout=0.01)
    assert failed["error"].startswith("timed out after 0 s; last output:")
    assert "| jpeft | lora | failed: timed out after 0 s; last output:" in bench.table([failed], cfg, {
        "date": "today", "device": None, "environment": {"commit": None}})
    # why a job died is never an empty string: an exit code with the worker's last line ...
    crashed = bench._run_job("peft-eager", "shoft", cfg, timeout=300)
    assert crashed["error"].startswith("exited with code 1; last output: ValueError: HF PEFT has no counterpart of 'shoft'")
    assert "Traceback" in crashed["log"]
    # ... or the signal that killed it (here a real process killed by SIGKILL, as the OOM killer does)
    killed = subprocess.run([sys.executable, "-c", "import os, signal; print('compiling', flush=True); "
                             "os.kill(os.getpid(), signal.SIGKILL)"], capture_output=True, text=True, timeout=60)
    assert bench.job_failure("jpeft", "oft", killed.returncode, killed.stdout)["error"] == (
        "killed by SIGKILL (signal 9); last output: compiling")
    assert bench.job_failure("jpeft", "oft", 0, "")["error"] == (
        "exited with code 0 without printing a result; last output: no output")
    with pytest.raises(ValueError, match="cannot be combined"):
        bench.jobs(bench.BenchConfig(compile_only=True), peft=True, peft_modes=("eager",))
    with pytest.raises(ValueError, match=r"cannot be combined with a mesh \(fsdp=2\)"):
        bench.jobs(bench.BenchConfig(mesh="fsdp=2"), peft=True, peft_modes=("eager",))
    # a mesh's workers get their fake CPU devices from XLA_FLAGS, added to the flags already there
    mesh_cfg = bench.BenchConfig(compile_only=True, mesh="data=2,fsdp=4", methods=("lora",), batch=8, seq_len=16,
                                 compute_dtype="float32", param_dtype="float32")  # float32: a faster CPU compile
    assert bench.worker_env(mesh_cfg, {"XLA_FLAGS": "--xla_cpu_foo=1"})["XLA_FLAGS"] == (
        "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    assert bench.worker_env(mesh_cfg, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8")
    assert "XLA_FLAGS" not in bench.worker_env(bench.BenchConfig(), {})
    with pytest.raises(ValueError, match=r"mesh data=64,fsdp=64 needs 4096 devices, this machine has \d+ cpu device"):
        bench.bench_mesh("data=64,fsdp=64")  # what a GPU worker says when the mesh needs more GPUs than there are
    # ... and one compile-only step on that mesh: fsdp=4 holds a quarter of every frozen array
    # of at least 2**14 elements (jpeft.sharding.fsdp_specs' min_size) on each device
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # a faster compile; kept in the worker's flags
    on_mesh = bench._run_job("jpeft", "lora", mesh_cfg, timeout=300)
    assert "error" not in on_mesh, on_mesh.get("log")
    assert on_mesh["mesh"] == "data=2,fsdp=4" and on_mesh["devices"] == 8 and on_mesh["memory_estimate_gib"] > 0
    assert on_mesh["xla_flags"] == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
    sizes = [x.size for x in jax.tree_util.tree_leaves(cli.abstract_model("tiny"))]
    big, small = sum(n for n in sizes if n >= 2**14), sum(n for n in sizes if n < 2**14)
    assert big > 3 * small  # the embedding, the head and the MLP kernels; Q/K/V/dense (64x64) stay whole
    f32 = 4 / 2**30  # GiB per element; the shares are exact, the tolerance is float rounding
    assert on_mesh["frozen_gib"] == pytest.approx((big + small) * f32, rel=1e-9)
    assert on_mesh["frozen_gib_per_device"] == pytest.approx((big / 4 + small) * f32, rel=1e-9)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "lorax", "--out", str(tmp_path)])
    assert "unknown method 'lorax'" in capsys.readouterr().err


def test_experiment_grid_quick_run(tmp_path):
    out = tmp_path / "grid"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "grid.py"), "--methods", "lora", "shoft", "--ranks", "2",
         "--tasks", "boolq", "--steps", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in rows) == ["lora", "shoft"] and all(r["rank"] == 2 for r in rows)
    assert "| lora | 2 |" in (out / "results.md").read_text() and (out / "results.png").exists()


def test_solve_bench_quick_run():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "solve_bench.py"), "--layers", "2", "--blocks", "2",
         "--size", "8", "--steps", "1", "--mechanisms", "lapack-batched", "jpeft"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()[2:]]
    assert [r[1].strip() for r in rows] == ["lapack-batched", "jpeft"]
    assert all(float(r[2]) > 0 for r in rows), proc.stdout  # two layers do not deadlock: both are timed
