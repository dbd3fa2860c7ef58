"""The ``jpeft`` command line: ``count``, ``demo`` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

THESIS_METHODS = ("lora", "dora", "lokr", "oft", "boft", "shoft", "rhoft")


def abstract_model(name: str):
    """Shapes of a named model's parameters (``jax.eval_shape``: nothing is allocated)."""
    from jpeft.models import phi

    config = phi.config(name)
    return jax.eval_shape(lambda k: phi.init(config, k)[1], jax.random.key(0))


def parse_hparams(items: list[str]) -> dict[str, dict]:
    """``["lora.r=8", "rhoft.k=512"]`` -> ``{"lora": {"r": 8}, "rhoft": {"k": 512}}`` (values as JSON)."""
    out: dict[str, dict] = {}
    for item in items:
        try:
            lhs, value = item.split("=", 1)
            method, name = lhs.split(".", 1)
        except ValueError:
            raise SystemExit(f"--set expects METHOD.NAME=VALUE, got {item!r}") from None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def cmd_count(args) -> None:
    from jpeft import report

    rows = report.count_table(
        abstract_model(args.model), args.methods, targets=args.targets, hparams=parse_hparams(args.set)
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"Parameter counts for {args.model} (targets: {args.targets or 'Q/K/V'}):\n")
        print(report.format_table(rows))


def cmd_demo(args) -> None:
    import jpeft
    from jpeft.models import phi

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    config = phi.config("tiny")
    model, params = phi.init(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    reference = model.apply({"params": params}, ids)
    print("Every method on a tiny Phi (Q/K/V targets), after a random update of its trainables:")
    for method in THESIS_METHODS:
        adapted = jpeft.apply(params, method, key=jax.random.key(2))
        start = float(jnp.abs(model.apply({"params": jpeft.materialize(adapted)}, ids) - reference).max())
        trainable, frozen = jpeft.partition(adapted)
        trainable = jax.tree_util.tree_map(lambda x: x + 0.01 * jnp.ones_like(x), trainable)
        adapted = jpeft.combine(trainable, frozen)
        factored = model.apply({"params": adapted}, ids)
        merged = model.apply({"params": jpeft.materialize(adapted)}, ids)
        counts = jpeft.count_params(adapted)
        print(
            f"  {method:6s} trainable {counts['trainable']:>8,}  |init - base| {start:.1e}"
            f"  |factored - merged| {float(jnp.abs(factored - merged).max()):.1e}"
        )
    print()
    args.model, args.methods, args.targets, args.set, args.json = "phi-1.5", THESIS_METHODS, None, [], False
    cmd_count(args)


def cmd_bench(args) -> None:
    from jpeft import bench

    cfg = bench.BenchConfig(
        model=args.model, batch=args.batch, seq_len=args.seq_len, methods=tuple(args.methods),
        targets=tuple(args.targets) if args.targets else None, compute_dtype=args.dtype,
        param_dtype=args.param_dtype, warmup=args.warmup, steps=args.steps, hparams=parse_hparams(args.set),
    )
    print(f"Benchmarking {len(cfg.methods)} method(s) on {cfg.model}, batch {cfg.batch} x {cfg.seq_len}:")
    results = bench.run(cfg, peft=args.peft)
    paths = bench.write_outputs(results, cfg, args.out)
    print(open(paths["md"]).read())
    print("wrote " + ", ".join(paths.values()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpeft", description="Parameter-efficient fine-tuning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    count = sub.add_parser("count", help="parameter-count table, computed from shapes only (works offline)")
    count.add_argument("--model", default="phi-1.5", help="a named configuration (default: phi-1.5)")
    count.add_argument("--methods", nargs="+", default=list(THESIS_METHODS))
    count.add_argument("--targets", nargs="+", default=None, help="target regexes (default: Q/K/V)")
    count.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE", help="override a hyper-parameter")
    count.add_argument("--json", action="store_true", help="print JSON instead of a table")
    count.set_defaults(func=cmd_count)

    bench = sub.add_parser("bench", help="time training steps of each method (and HF PEFT with --peft)")
    bench.add_argument("--model", default="tiny", help="tiny, or phi-1.5 (random weights, real shapes)")
    bench.add_argument("--batch", type=int, default=16)
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--methods", nargs="+", default=list(THESIS_METHODS))
    bench.add_argument("--targets", nargs="+", default=None)
    bench.add_argument("--dtype", default="bfloat16", help="compute dtype")
    bench.add_argument("--param-dtype", default="bfloat16", help="dtype of the frozen base weights")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE")
    bench.add_argument("--peft", action="store_true", help="also time HF PEFT (torch), eager and torch.compile")
    bench.add_argument("--out", default="runs/bench", help="output directory for JSON, markdown and PNG")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="adapt a tiny Phi with every method and print the Phi-1.5 count table")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError) as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
