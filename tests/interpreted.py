"""Run a test file's `__main__` checks in Triton's interpreter: a fresh Python with TRITON_INTERPRET=1 (Triton reads
it when it is imported), which is how the tests run the kernels on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(path: str | Path, marker: str, *args: str, timeout: float = 300) -> None:
    """`python path *args` under the interpreter; it must exit 0 and print `marker`."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert marker in run.stdout, run.stdout
