"""The thesis' comparison grid: methods x ranks x tasks x seeds (its Figures 4.4, 5.3, 6.10, 7.x).

By default a quick version runs here in minutes: the tiny random-weight Phi, the bundled
sample data, 40 steps per run. With a GPU, hub access (or local copies) and a Phi-1.5
checkpoint, the thesis' setting is:

    python experiments/grid.py --thesis --model microsoft/phi-1_5 --data-dir DATA \
        --methods lora dora oft shoft rhoft --ranks 4 8 16 32 64 --seeds 5 --out experiments/results/grid

Each run writes its own directory under OUT/runs (finished runs are skipped when the
script is started again); OUT/results.{md,json,png} aggregate them.
"""

import argparse
import os

from _common import add_common_args, aggregate, rank_hparams, run_point, write_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--methods", nargs="+", default=["lora", "dora", "oft", "shoft", "rhoft"])
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dim = 2048 if args.thesis or args.model != "tiny" else 64
    summaries = []
    for method in args.methods:
        for r in args.ranks:
            hparams = rank_hparams(method, r, dim)
            if method == "rhoft" and not args.thesis and args.model == "tiny":
                hparams["k"] = dim // 2
            for seed in range(args.seeds):
                s = run_point(args, f"{method}-r{r}", method, hparams, seed)
                s["rank"] = r
                summaries.append(s)
                print(f"{method:6s} r={r:<3d} seed={seed}  average accuracy "
                      f"{sum(v['accuracy'] for v in s['results'].values()) / len(s['results']):.3f}", flush=True)
    md = write_table(aggregate(summaries, "rank"), "rank", args.out, "Average accuracy by method and rank")
    print(open(md).read())


if __name__ == "__main__":
    main()
