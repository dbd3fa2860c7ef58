"""``python -m jpeft.bench PAYLOAD``: one benchmark job in a worker process (:func:`jpeft.bench.runner.worker`)."""

import sys

from jpeft.bench.runner import worker

worker(sys.argv[1])
