"""Shared test hygiene and the GPU machine's selection.

- After a test that used CUDA, its dropped engines' cached memory goes back to the driver, so every test starts from
  the GPU memory a fresh process would see (an engine's KV cache is sized from free memory).
- `--cuda-only` keeps the tests that need CUDA (a skipif naming CUDA or GPUs, or "cuda" / "gpu" in the test's id):
  `python -m pytest --cuda-only -q -rs tests` is the GPU machine's run of every CUDA test.
- `--shard K/N` keeps the K-th of N consecutive, near-equal runs of the selected tests (1 <= K <= N), so a run too
  long for one call of the GPU machine (at most 600 s) splits into calls: `--cuda-only --shard 1/4`, ... `4/4`.
"""

import gc
import re

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--cuda-only", action="store_true", help="run only the tests that need CUDA")
    parser.addoption("--shard", metavar="K/N", help="run only the K-th of N consecutive runs of the selected tests")


def _shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    k, n = (int(match[1]), int(match[2])) if match else (0, 0)
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 2/4")
    return k, n


def _needs_cuda(item) -> bool:
    reasons = " ".join(f"{m.kwargs.get('reason', '')} {' '.join(map(str, m.args))}"
                       for m in item.iter_markers("skipif"))
    return re.search(r"cuda|gpu", f"{reasons} {item.nodeid}", re.I) is not None


def pytest_configure(config):
    if config.getoption("--shard"):  # before collection: a bad value stops the run at once
        _shard(config.getoption("--shard"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cuda-only"):
        config.hook.pytest_deselected(items=[item for item in items if not _needs_cuda(item)])
        items[:] = [item for item in items if _needs_cuda(item)]
    if config.getoption("--shard"):
        k, n = _shard(config.getoption("--shard"))
        lo, hi = (k - 1) * len(items) // n, k * len(items) // n
        config.hook.pytest_deselected(items=items[:lo] + items[hi:])
        items[:] = items[lo:hi]


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never on a CPU-only run
        gc.collect()
        torch.cuda.empty_cache()
