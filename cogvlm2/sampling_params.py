"""Per-request sampling settings, shared by the simple generation loop, the engine and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this sample as greedy: logits / 1e-40 overflow float32 to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """temperature 0 (or below MIN_TEMPERATURE) means greedy. top_k <= 0 and top_p == 1 disable those filters.

    repetition_penalty (HF semantics, over prompt and generated ids: positive logits divided,
    negative multiplied); presence / frequency penalties (OpenAI semantics, generated ids only).
    Generation stops at max_new_tokens, at any id in `stop_token_ids` or the model's EOS ids (unless
    ignore_eos), or when the text contains a string of `stop` (which is cut from the output).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    def stop_ids(self, eos_token_ids) -> set[int]:
        """The ids that end generation: stop_token_ids, and the model's EOS ids unless ignore_eos."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
