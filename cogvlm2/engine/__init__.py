"""The serving engine: continuous batching over a paged KV cache (requests in, token ids out)."""

from .async_llm import AsyncLLM
from .config import EngineConfig
from .llm import LLM
from .llm_engine import LLMEngine
from .protocol import EngineClient, EngineStats, RequestMetrics, RequestOutput

__all__ = ["AsyncLLM", "EngineConfig", "LLM", "LLMEngine", "EngineClient", "EngineStats", "RequestMetrics",
           "RequestOutput"]
