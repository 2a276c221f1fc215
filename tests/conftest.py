"""Shared test hygiene and the GPU machine's selection.

- After a test that used CUDA, its dropped engines' cached memory goes back to the driver, so every test starts from
  the GPU memory a fresh process would see (an engine's KV cache is sized from free memory).
- `--cuda-only` keeps the tests that need CUDA (a skipif naming CUDA or GPUs, or "cuda" / "gpu" in the test's id):
  `python -m pytest --cuda-only -q -rs tests` is the GPU machine's run of every CUDA test.
"""

import gc
import re

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--cuda-only", action="store_true", help="run only the tests that need CUDA")


def _needs_cuda(item) -> bool:
    reasons = " ".join(f"{m.kwargs.get('reason', '')} {' '.join(map(str, m.args))}"
                       for m in item.iter_markers("skipif"))
    return re.search(r"cuda|gpu", f"{reasons} {item.nodeid}", re.I) is not None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cuda-only"):
        config.hook.pytest_deselected(items=[item for item in items if not _needs_cuda(item)])
        items[:] = [item for item in items if _needs_cuda(item)]


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never on a CPU-only run
        gc.collect()
        torch.cuda.empty_cache()
