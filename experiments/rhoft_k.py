"""The thesis' RHOFT k ablation (§7.5): accuracy against the kept rank k at r_U = r_V = 16.

Quick default here: the tiny random-weight Phi (width 64) and the bundled samples. The
thesis' setting (k from 64 to 2048 on Phi-1.5):

    python experiments/rhoft_k.py --thesis --model microsoft/phi-1_5 --data-dir DATA \
        --ks 64 128 256 512 1024 2048 --seeds 5 --out experiments/results/rhoft_k
"""

import argparse
import os

from _common import add_common_args, aggregate, run_point, write_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--ks", nargs="+", type=int, default=[8, 32])
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    r = args.r if args.thesis or args.model != "tiny" else 4
    summaries = []
    for k in args.ks:
        for seed in range(args.seeds):
            s = run_point(args, f"rhoft-k{k}", "rhoft", {"r_u": r, "r_v": r, "k": k}, seed)
            s["k"] = k
            summaries.append(s)
            print(f"rhoft k={k:<5d} seed={seed}  final loss {s['final_loss']:.3f}", flush=True)
    md = write_table(aggregate(summaries, "k"), "k", args.out, f"RHOFT accuracy against k (r_U = r_V = {r})")
    print(open(md).read())


if __name__ == "__main__":
    main()
