"""How to invert the Cayley blocks of many adapted layers at once: the measurement behind
``jpeft.linalg.inverse_positive_real`` (README, "Known platform issues").

Times ``jit(grad(Σ_layers ‖cayley(Q_l)‖²))`` for ``--layers`` nodes of ``--blocks`` skew
blocks of ``--size``, one mechanism per subprocess (a deadlock is reported as a timeout):

- ``lapack-batched``: ``jnp.linalg.solve(I - Q, I + Q)`` on the whole batch (jpeft before
  the fix; on a CPU with jaxlib 0.10 it deadlocks from about ten layers);
- ``lapack-map``: the same solve per block inside ``lax.map`` (unbatched LAPACK calls);
- ``jpeft``: ``2 (I - Q)^{-1} - I`` through ``jpeft.linalg.cayley``: Gauss–Jordan in ``jnp``
  on a CPU, ``jnp.linalg.inv`` elsewhere, derivative by two matmuls.

    python experiments/solve_bench.py --layers 8 12 72 --blocks 8 8 32
"""

import argparse
import json
import statistics
import subprocess
import sys

MECHANISMS = ("lapack-batched", "lapack-map", "jpeft")


def worker(mechanism: str, layers: int, blocks: int, size: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jpeft import linalg
    from jpeft.bench import timed_steps

    eye = jnp.eye(size)
    cayley = {
        "lapack-batched": lambda s: jnp.linalg.solve(eye - s, eye + s),
        "lapack-map": lambda s: jax.lax.map(lambda a: jnp.linalg.solve(eye - a, eye + a), s),
        "jpeft": linalg.cayley,
    }[mechanism]
    qs = [0.01 * jax.random.normal(jax.random.key(i), (blocks, size, size)) for i in range(layers)]
    step = jax.jit(jax.grad(lambda qs: sum(jnp.sum(cayley(q - jnp.swapaxes(q, -1, -2)) ** 2) for q in qs)))
    (first,) = timed_steps(lambda: jax.block_until_ready(step(qs)), 0, 1)
    times = timed_steps(lambda: jax.block_until_ready(step(qs)), 0, steps)
    return {"device": jax.devices()[0].device_kind, "compile_and_first_s": first, "ms": 1e3 * statistics.median(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+", type=int, default=[8, 12, 72])
    p.add_argument("--blocks", nargs="+", type=int, default=[8, 8, 32], help="one per --layers entry")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if len(args.blocks) != len(args.layers):
        p.error(f"--blocks needs one entry per --layers entry ({len(args.layers)}), got {len(args.blocks)}")
    print("| layers x blocks x size | mechanism | step ms (fwd + bwd) | compile + first s |\n|---|---|---:|---:|")
    for layers, blocks in zip(args.layers, args.blocks):
        for mechanism in args.mechanisms:
            job = json.dumps([mechanism, layers, blocks, args.size, args.steps])
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", job], capture_output=True, text=True,
                                      timeout=args.timeout)
                r = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else None
                shown = f"{r['ms']:.1f} | {r['compile_and_first_s']:.1f}" if r else f"failed (exit {proc.returncode}) | —"
            except subprocess.TimeoutExpired:
                shown = f"no result in {args.timeout:.0f} s (deadlock) | —"
            print(f"| {layers} x {blocks} x {args.size} | {mechanism} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
