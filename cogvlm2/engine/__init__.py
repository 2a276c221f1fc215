"""The serving engine: continuous batching over a paged KV cache (EngineInputs in, token ids out).

`LLM`, `LLMEngine` and `AsyncLLM` are the front-end's (`cogvlm2.llm`, `cogvlm2.async_llm`: they add the
processor and text); they are re-exported here on first use, for code written against the old layout.
"""

from .config import EngineConfig
from .core import EngineCore
from .inputs import EngineInputs
from .protocol import EngineClient, EngineStats, RequestMetrics, RequestOutput
from .worker import EngineWorker, ModelSpec, Worker

__all__ = ["AsyncLLM", "EngineConfig", "EngineCore", "EngineInputs", "EngineWorker", "LLM", "LLMEngine",
           "ModelSpec", "Worker", "EngineClient", "EngineStats", "RequestMetrics", "RequestOutput"]

_FRONT_END = {"LLM": "cogvlm2.llm", "LLMEngine": "cogvlm2.llm", "AsyncLLM": "cogvlm2.async_llm"}


def __getattr__(name: str):
    if name in _FRONT_END:  # imported lazily: the engine itself never imports the front-end
        import importlib

        return getattr(importlib.import_module(_FRONT_END[name]), name)
    raise AttributeError(f"module 'cogvlm2.engine' has no attribute {name!r}")
