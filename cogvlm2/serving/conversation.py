"""OpenAI chat messages -> one CogVLM2 prompt: the query, the history of (query, answer) pairs, one media.

CogVLM2 has no system role: system (and developer) text is prepended to the first user query, so the
start of the prompt stays the same across turns. Consecutive user messages are separate turns, the
earlier ones with an empty answer (as the official API demo maps them); consecutive assistant messages
are joined. An image
model sees one image per conversation: the latest `image_url` in the messages (the official demo's
rule); earlier ones are ignored. Video checkpoints take `video_url` parts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import APIError
from .protocol import AssistantMessage, ImagePart, Message, SystemMessage, TextPart, UserMessage, VideoPart


@dataclass
class Conversation:
    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    media_kind: str | None = None  # "image" / "video"
    media_url: str | None = None
    num_media_ignored: int = 0  # earlier images / videos, not shown to the model


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(p.text for p in content if isinstance(p, TextPart))


def parse_messages(messages: list[Message], media_kinds: tuple[str, ...]) -> Conversation:
    """Raises APIError (400) for conversations the model cannot take (media_kinds: the processor's)."""
    kind = "video" if "video" in media_kinds else "image"
    if not isinstance(messages[-1], UserMessage):
        raise APIError(f"the last message must be from the user, got role {messages[-1].role!r}", param="messages")
    wanted, other = (VideoPart, ImagePart) if kind == "video" else (ImagePart, VideoPart)
    system: list[str] = []
    turns: list[list[str]] = []  # [query, answer]; the last one has no answer yet
    media: list[str] = []
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            system.append(_text(message.content))
        elif isinstance(message, UserMessage):
            if isinstance(message.content, list):
                for part in message.content:
                    if isinstance(part, other):
                        raise APIError(f"messages.{i}: this is {'a video' if kind == 'video' else 'an image'} model; "
                                       f"send {kind}_url parts, not {part.type}", param=f"messages.{i}.content")
                    if isinstance(part, wanted):
                        media.append(part.video_url.url if kind == "video" else part.image_url.url)
            if turns and len(turns[-1]) == 1:
                turns[-1].append("")  # an unanswered question stays a turn of its own
            turns.append([_text(message.content)])
        elif isinstance(message, AssistantMessage):
            if not turns:
                raise APIError(f"messages.{i}: an assistant message comes before any user message", param="messages")
            answer = _text(message.content)
            if len(turns[-1]) == 2:
                turns[-1][1] = f"{turns[-1][1]}\n{answer}"
            else:
                turns[-1].append(answer)
    sys_text = "\n".join(s for s in system if s)
    if sys_text:
        turns[0][0] = f"{sys_text}\n{turns[0][0]}"
    history = [(q, a) for q, a in turns[:-1]]
    return Conversation(turns[-1][0], history, kind if media else None, media[-1] if media else None,
                        max(len(media) - 1, 0))
