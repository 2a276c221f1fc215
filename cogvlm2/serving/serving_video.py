"""POST /video_qa: the official CogVLM2 video demo's API (multipart `video`, `question`, `temperature`).

Defaults as the official `video_demo/api_demo.py`: chat template and chat frame strategy for every video
checkpoint (as its `inference.py`), an empty question (or "@Caption") asks for a detailed
description; temperature defaults to 0.001 and generation is greedy anyway (top_k=1), up to 2048 new
tokens (cut to what the context leaves).
"""

from __future__ import annotations

from ..sampling_params import SamplingParams
from .errors import APIError
from .protocol import VideoQAResponse, completion_id
from .serving_engine import OpenAIServing

DEFAULT_QUESTION = "Please describe the video in detail."
DEFAULT_TEMPERATURE = 0.001
MAX_NEW_TOKENS = 2048


class ServingVideoQA(OpenAIServing):
    async def answer(self, video: bytes, question: str | None, temperature: float | None) -> VideoQAResponse:
        if "video" not in self.ctx.media_kinds:
            raise APIError("/video_qa needs a video checkpoint; this server runs an image model "
                           "(use /v1/chat/completions with image_url parts)", param="video")
        if not video:
            raise APIError("no video file found (the multipart field 'video' is empty)", param="video")
        if not question or question == "@Caption":
            question = DEFAULT_QUESTION
        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        if not 0 <= temperature <= 2:
            raise APIError(f"temperature must be in [0, 2], got {temperature}", param="temperature")
        with self.ctx.prepare(1):
            # video_demo/inference.py (the API demo) drives every video checkpoint with the chat template and frames
            inputs = await self.build_inputs(question, [], video=video, text_param="question", media_param="video",
                                             template="chat", video_strategy="chat")
            budget = self.max_tokens(inputs, None, prompt_param="question")
        params = SamplingParams(max_new_tokens=min(MAX_NEW_TOKENS, budget), temperature=temperature, top_k=1, top_p=0.1)
        text = ""
        async for _, out in self.generate(completion_id(), inputs, [params]):
            text = out.text
        return VideoQAResponse(answer=text)
