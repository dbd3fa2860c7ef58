"""Benchmark every method (and HF PEFT with --peft); same options as `jpeft bench`.

On a GPU, the issue's setting:
    python experiments/bench.py --model phi-1.5 --batch 16 --seq-len 256 --peft \
        --out experiments/results/$(date +%F)-<device>
"""

import sys

from jpeft.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
