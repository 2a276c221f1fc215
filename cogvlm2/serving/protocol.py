"""Wire formats: pydantic models of the OpenAI API subset we serve, fields ordered as in OpenAI's docs.

Requests ignore unknown fields (clients send many we do not use) and convert themselves into what the
engine takes (`ChatCompletionRequest.to_sampling_params`). Responses are what OpenAI returns.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_serializer, model_validator

from ..sampling_params import SamplingParams
from .limits import MAX_MESSAGES, MAX_N, MAX_STOP, MAX_STOP_CHARS

INT64 = 2**63
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str) -> str:
    """JSON's \\u escapes (\\ud800 ...) can spell lone UTF-16 surrogates, which are no text: refuse them (400)."""
    if (m := _SURROGATE.search(text)) is not None:
        raise ValueError(f"invalid Unicode: lone surrogate U+{ord(m.group()):04X} at character {m.start()}")
    return text


Text = Annotated[str, AfterValidator(check_unicode)]  # every string a request carries


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# --------------------------------------------------------------------------- models


class ModelCard(OpenAIModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    object: Literal["model"] = "model"
    owned_by: str = "cogvlm2"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- chat completion request


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: Text


class ImageURL(OpenAIModel):
    url: Text
    detail: Literal["auto", "low", "high"] = "auto"  # accepted, not used: every image is resized to the tower's size


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(OpenAIModel):
    url: Text


class VideoPart(OpenAIModel):
    """Not in OpenAI's API; the same shape as vLLM's `video_url` part."""

    type: Literal["video_url"]
    video_url: VideoURL


class RefusalPart(OpenAIModel):
    type: Literal["refusal"]
    refusal: Text


UserPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]
AssistantPart = Annotated[Union[TextPart, RefusalPart], Field(discriminator="type")]


class SystemMessage(OpenAIModel):
    content: Text | list[TextPart]
    role: Literal["system", "developer"]
    name: Text | None = None


class UserMessage(OpenAIModel):
    content: Text | list[UserPart]
    role: Literal["user"]
    name: Text | None = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"]
    content: Text | list[AssistantPart] | None = None
    name: Text | None = None
    refusal: Text | None = None


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(check_unicode)]


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIModel):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: Text | None = None  # None: the served model
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens; both work
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: StopString | list[StopString] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(0.0, ge=0, le=2)  # absent: greedy, as every official demo decodes
    top_p: float = Field(1.0, gt=0, le=1)
    user: Text | None = None
    # Not in OpenAI's API (vLLM has the same two): -1 or 0 disables top-k; 1.0 disables the penalty.
    top_k: int = Field(0, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop sequences")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_tokens: int, index: int = 0) -> SamplingParams:
        """Choice `index` of this request: with a seed, choice i samples with seed + i (distinct, reproducible)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + index,
            stop=stop,
        )


# --------------------------------------------------------------------------- chat completion response


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ResponseMessage(OpenAIModel):
    content: str | None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"


class Choice(OpenAIModel):
    finish_reason: str | None
    index: int
    logprobs: None = None
    message: ResponseMessage


class Usage(OpenAIModel):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int


class ChatCompletionResponse(OpenAIModel):
    id: str
    choices: list[Choice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage


class DeltaMessage(OpenAIModel):
    content: str | None = None
    role: Literal["assistant"] | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        return {k: v for k, v in (("content", self.content), ("role", self.role)) if v is not None}


class ChunkChoice(OpenAIModel):
    delta: DeltaMessage
    finish_reason: str | None = None
    index: int
    logprobs: None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --------------------------------------------------------------------------- /video_qa (the official video demo's API)


class VideoQAResponse(OpenAIModel):
    answer: str
