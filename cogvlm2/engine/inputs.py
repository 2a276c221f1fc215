"""EngineInputs: one prompt as the engine takes it: token ids, rotary positions, routing and media tensors.

The engine owns this type and knows nothing else about a request: no tokenizer, template, text or file
path. The front-end's processor (`processing/`) builds it (its `ModelInputs` extends it with training
labels and the prompt text) and computes every model quirk once, as data: which tokens a media
embedding replaces, which positions tokens share, which tokens use the visual expert.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..model.batch import TokenSpan, clip_segments

VISION_SLOT = 1  # token_type_ids value of a token whose embedding a media feature replaces


@dataclass
class EngineInputs:
    """input_ids        prompt token ids
    token_type_ids      per token: VISION_SLOT where a vision feature replaces the embedding, else 0
    position_ids        rotary positions (an image's inner tokens share one)
    pixel_values        [n, 3, S, S]: n = 1 image or T video frames; their encoder output, flattened in
                        order, replaces the embeddings of the VISION_SLOT tokens
    vision_hash         identifies the pixels (feature cache and prefix-cache key); None: hashed on demand
    expert_segments     [(start, end), ...] runs of tokens that use the visual-expert weights, sorted and
                        disjoint (keyword only; None: no token does). Generated tokens never do.
    """

    input_ids: list[int]
    token_type_ids: list[int]
    position_ids: list[int]
    pixel_values: torch.Tensor | None = None
    vision_hash: str | None = None
    expert_segments: list[tuple[int, int]] | None = field(default=None, kw_only=True)
    _finite: tuple[torch.Tensor, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    def mark_pixels_finite(self) -> None:
        """Record that pixel_values, as they are now, hold only finite values (the Processor's pixels, made
        from 8-bit media): the engine then skips its check over them (~2 ms for a 1344² image, on the way to
        the first token). Replacing the tensor or changing it in place undoes the mark."""
        self._finite = None if self.pixel_values is None else (self.pixel_values, self.pixel_values._version)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_finite"] = self.pixels_known_finite  # a flag: unpickling rebuilds the tensor (new version counter)
        return state

    def __setstate__(self, state: dict) -> None:
        known = state.pop("_finite", False) is True
        self.__dict__.update(state)
        self._finite = None
        if known:
            self.mark_pixels_finite()

    def with_pixels_in(self, dtype: torch.dtype) -> "EngineInputs":
        """A copy whose pixel_values are cast to the floating `dtype` (the rest shared). A finiteness mark carries
        over to a 16-bit or wider float: the Processor's normalized pixels lie within a few units of zero."""
        cast = dataclasses.replace(self, pixel_values=self.pixel_values.to(dtype))
        if self.pixels_known_finite and torch.finfo(dtype).max > 1e4:
            cast.mark_pixels_finite()
        return cast

    @property
    def pixels_known_finite(self) -> bool:
        """pixel_values are the very tensor `mark_pixels_finite` saw, unchanged since (its version counter)."""
        f = self._finite
        return f is not None and f[0] is self.pixel_values and f[1] == self.pixel_values._version

    @property
    def num_vision_tokens(self) -> int:
        return sum(t == VISION_SLOT for t in self.token_type_ids)

    @property
    def vision_expert_mask(self) -> list[bool]:
        """Per prompt token: whether it uses the visual-expert weights (expert_segments as a mask)."""
        mask = [False] * len(self.input_ids)
        for a, b in self.expert_segments or ():
            mask[a:b] = [True] * (b - a)
        return mask

    def span(self, start: int = 0, end: int | None = None) -> TokenSpan:
        """Prompt tokens [start, end) (default: all) as the batch builder takes them."""
        end = len(self) if end is None else end
        slots = [i - start for i in range(start, end) if self.token_type_ids[i] == VISION_SLOT]
        return TokenSpan(self.input_ids[start:end], self.position_ids[start:end],
                         clip_segments(self.expert_segments, start, end), slots)

    @property
    def next_position(self) -> int:
        """Position of the first generated token: previous maximum + 1."""
        return max(self.position_ids) + 1

    def output_budget(self, max_model_len: int, max_position_embeddings: int) -> int:
        """How many tokens can be generated after this prompt: the KV budget counts tokens, the rotary
        budget counts positions (vision tokens share them: an image's 2306 tokens span 3), and the last
        generated token is never fed back, so it needs no position of its own."""
        return min(max_model_len - len(self), max_position_embeddings - self.next_position + 1)


def mask_to_segments(mask: list[bool]) -> list[tuple[int, int]]:
    """Runs of True in a routing mask: [(start, end), ...]."""
    out: list[tuple[int, int]] = []
    for i, v in enumerate(mask):
        if not v:
            continue
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
