"""Prompt building exactly as the official `build_conversation_input_ids`: templates, vision placeholders,
token types, position ids and visual-expert routing — every CogVLM2 prompt quirk, computed once, as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import TEMPLATES, VISION_TOKEN_ID, ModelConfig
from ..engine.inputs import EngineInputs, mask_to_segments
from .tokenizer import Tokenizer

LANGUAGE, VISION = 0, 1
History = Sequence[tuple[str, str]]


def format_prompt(query: str, history: History = (), template: str = "chat") -> str:
    """`chat`: "Question: q Answer: a\\n" per past turn, then "Question: {query} Answer:";
    `vqa`: the same with "Short answer:"; `base`: the query alone (history ignored)."""
    if template == "base":
        return query
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    tag = "Answer:" if template == "chat" else "Short answer:"
    past = "".join(f"Question: {q} {tag} {a}\n" for q, a in history)
    return f"{past}Question: {query} {tag}"


def position_ids(token_types: Sequence[int], valid: Sequence[bool] | None = None) -> list[int]:
    """Rotary positions of the official `build_position_ids`.

    The first and last token of each run of vision tokens (boi, eoi) count as ordinary tokens; the
    inner tokens of a run share one position, so an image of 2306 tokens spans 3 positions. Tokens
    with valid=False (padding) count as language tokens that do not advance the position.
    """
    types = [t if (valid is None or valid[i]) else -1 for i, t in enumerate(token_types)]
    n = len(types)
    inner = [
        t == VISION and 0 < i < n - 1 and types[i - 1] == VISION and types[i + 1] == VISION
        for i, t in enumerate(types)
    ]
    out, pos = [], 0
    for i, t in enumerate(types):
        if i > 0:
            # A position advances for a language / boi / eoi token, and for an inner vision token
            # right after a boundary token (the first patch); padding never advances it.
            is_lang = t == LANGUAGE or (t == VISION and not inner[i])
            if is_lang or (inner[i] and not inner[i - 1]):
                pos += 1
        out.append(pos)
    return out


def vision_expert_mask(token_types: Sequence[int]) -> list[bool]:
    """Token i uses the visual-expert weights iff it and token i+1 are vision tokens: boi and the
    patches do, eoi and the last token of the sequence never do."""
    n = len(token_types)
    return [token_types[i] == VISION and i + 1 < n and token_types[i + 1] == VISION for i in range(n)]


@dataclass
class ModelInputs(EngineInputs):
    """One prompt built by the processor: the engine's inputs plus what only training and display use.

    labels: training targets (-100 where no loss); prompt_text: the templated prompt. Routing
    (`expert_segments`) is computed from the token types by the official rule when not given.
    """

    labels: list[int] | None = None
    prompt_text: str = ""

    def __post_init__(self) -> None:
        if self.expert_segments is None:
            self.expert_segments = mask_to_segments(vision_expert_mask(self.token_type_ids))


def build_inputs(
    tokenizer: Tokenizer,
    config: ModelConfig,
    query: str,
    history: History = (),
    pixel_values: torch.Tensor | None = None,
    vision_hash: str | None = None,
    template: str | None = None,
    answer: str | None = None,
) -> ModelInputs:
    """`[BOS] + vision placeholders + encode(prompt text)`, as the official prompt builder.

    Image models take at most one image ([3, S, S] or [1, 3, S, S]) placed right after BOS. Video
    models take frames [T, 3, S, S]: 66 placeholders per frame, and with the chat template each
    frame is followed by its index as text ("0", "1", ...). With `answer` (training), the answer ids
    and EOS are appended and `labels` mark only them (-100 elsewhere).
    """
    template = template or config.template_version
    text = format_prompt(query, history, template)
    ids, types = [config.bos_token_id], [LANGUAGE]
    per_frame = config.vision.tokens_per_image
    if pixel_values is not None:
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        s = config.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be [n, 3, {s}, {s}], got {tuple(pixel_values.shape)}")
        if not config.is_video and pixel_values.shape[0] != 1:
            raise ValueError(f"image models take at most one image, got {pixel_values.shape[0]}")
        for t in range(pixel_values.shape[0]):
            ids += [VISION_TOKEN_ID] * per_frame
            types += [VISION] * per_frame
            if config.is_video and template == "chat":
                index_ids = tokenizer.encode(str(t))
                ids += index_ids
                types += [LANGUAGE] * len(index_ids)
    text_ids = tokenizer.encode(text)
    labels = None
    if answer is not None:
        answer_ids = tokenizer.encode(answer) + [config.eos_token_ids[0]]
        labels = [-100] * (len(ids) + len(text_ids)) + answer_ids
        text_ids = text_ids + answer_ids
    ids += text_ids
    types += [LANGUAGE] * len(text_ids)
    return ModelInputs(ids, types, position_ids(types), pixel_values, vision_hash if pixel_values is not None else None,
                       labels, text)
