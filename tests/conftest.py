"""Shared test hygiene: after a test that used CUDA, its dropped engines' cached memory goes back to the driver, so
every test starts from the GPU memory a fresh process would see (an engine's KV cache is sized from free memory)."""

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never on a CPU-only run
        gc.collect()
        torch.cuda.empty_cache()
