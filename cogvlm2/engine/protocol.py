"""The engine's public contract: what a request produces and the small client interface the server uses.

Serving code depends on this file only (vLLM's EngineClient idea); the engine implements it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Protocol

from .inputs import EngineInputs
from ..sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic() when the request was added
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A snapshot of one request, emitted after every step that changed it.

    The engine fills the id fields; the front-end (`cogvlm2.llm`) fills text / delta_text.
    token_ids / text are cumulative; delta_token_ids / delta_text are what is new since the previous
    output of the same request. finish_reason is set on the last output only: "stop" (EOS, a stop id
    or a stop string, which is cut from `text`), "length" (max_new_tokens or the context limit), or
    "abort". prompt_len counts every prompt token, vision placeholders included. `error` is set
    (with finish_reason "abort") when the engine failed this request: what went wrong, for the log.
    """

    request_id: str
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_blocks_free / max(self.kv_blocks_total, 1)


class EngineClient(Protocol):
    """What the server needs from an engine running in the same process."""

    max_model_len: int

    def generate(self, request_id: str, inputs: EngineInputs, params: SamplingParams,
                 adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request (`adapter`: the name of a loaded LoRA adapter, None: the base model) and
        stream its outputs until it finishes. Leaving the iterator early (client
        disconnect, task cancellation) aborts the request and frees its KV blocks."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...
