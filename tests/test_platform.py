"""Platform regressions: steps that must finish on a CPU (see ``many_solves.py``)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
#: A healthy run takes about 20 s on 2 cores; a deadlock never returns.
TIMEOUT_S = 300


@pytest.mark.parametrize("case", ["oft", "boft", "vmapped"])
def test_many_concurrent_solves_finish_on_cpu(case):
    cmd = [sys.executable, os.path.join(HERE, "many_solves.py"), case]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: two training steps did not finish in {TIMEOUT_S} s: the in-step solves deadlocked "
                    "(see the 'Known platform issues' section of the README)")
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr[-3000:]
