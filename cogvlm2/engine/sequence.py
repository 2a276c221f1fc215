"""Sequence: the engine's state of one request (prompt, generated ids, KV blocks, progress, metrics).

Token i of a sequence is the prompt token i for i < num_prompt_tokens, else generated token
j = i - num_prompt_tokens: a language token at rotary position next_position + j that never uses the
visual expert. `num_computed_tokens` counts tokens whose K/V is in the cache; a sequence samples a
token in a step after which every token it holds is computed.

Under async scheduling the token sampled by the step in flight is not in `token_ids` yet: a
lookahead step decodes it straight from the device, and it is appended when that step is collected
(so `token_ids` and `num_computed_tokens` always describe collected steps only).
"""

from __future__ import annotations

import bisect
import enum
import time

from ..model.batch import TokenSpan
from ..sampling_params import SamplingParams
from .inputs import VISION_SLOT, EngineInputs
from .protocol import RequestMetrics


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, inputs: EngineInputs, params: SamplingParams,
                 arrival_time: float | None = None, adapter_slot: int = 0, adapter_id: str | None = None):
        self.request_id = request_id
        self.adapter_slot = adapter_slot  # the LoRA slot its steps run with (0: the base model)
        self.adapter_id = adapter_id  # that adapter's content id: part of its prefix-cache hashes
        self.inputs = inputs
        self.params = params
        self.token_ids: list[int] = list(inputs.input_ids)
        self.num_prompt_tokens = len(inputs)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the leading full, computed blocks
        self.hash_chain: list[bytes] = []  # prefix-cache hashes of full blocks (computed or not), memoised
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit of the first admission
        self.num_preemptions = 0
        self.metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._expert_mask = inputs.vision_expert_mask  # over the FULL prompt; sliced per chunk
        self.vision_token_idx = [i for i, t in enumerate(inputs.token_type_ids) if t == VISION_SLOT]
        # 1 + the last prompt token that takes a vision feature or the visual expert (0: none): every token from
        # here on is plain text, whose K/V the language weights alone compute
        self.vision_end = 1 + max([i for i, m in enumerate(self._expert_mask) if m] + self.vision_token_idx[-1:],
                                  default=-1)
        self.next_position = inputs.next_position

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def vision_hash(self) -> str | None:
        """Identifies this prompt's pixels (features cache and prefix-cache key); None without vision."""
        if not self.vision_token_idx:
            return None
        if self.inputs.vision_hash is None:  # hand-built inputs: hash the pixels ourselves
            import hashlib

            pixels = self.inputs.pixel_values.float().contiguous().numpy().tobytes()
            self.inputs.vision_hash = hashlib.blake2b(pixels, digest_size=16).hexdigest()
        return self.inputs.vision_hash

    @property
    def has_pending_vision(self) -> bool:
        """Some vision token's K/V is not in the cache yet (its features are still needed)."""
        return bool(self.vision_token_idx) and self.num_computed_tokens <= self.vision_token_idx[-1]

    def positions(self, start: int, end: int) -> list[int]:
        n = self.num_prompt_tokens
        prompt = self.inputs.position_ids[start:min(end, n)]
        return prompt + list(range(self.next_position + max(start, n) - n, self.next_position + end - n))

    def span(self, start: int, end: int) -> TokenSpan:
        """Tokens start..end-1 (prompt and generated) as the batch builder takes them."""
        n = self.num_prompt_tokens
        prompt = self.inputs.span(min(start, n), min(end, n))  # generated tokens: no routing, no vision
        return TokenSpan(self.token_ids[start:end], self.positions(start, end), prompt.expert_segments,
                         prompt.vision_slots)

    def token_types(self, start: int, end: int) -> list[int]:
        return self._prompt_slice(self.inputs.token_type_ids, start, end, 0)

    def expert_mask(self, start: int, end: int) -> list[bool]:
        return self._prompt_slice(self._expert_mask, start, end, False)

    def _prompt_slice(self, per_prompt_token: list, start: int, end: int, generated):
        """Tokens start..end-1 of a per-prompt-token list; `generated` for each generated token."""
        n = self.num_prompt_tokens
        return per_prompt_token[start:min(end, n)] + [generated] * max(0, end - max(start, n))

    def vision_range(self, start: int, end: int) -> tuple[int, int]:
        """Feature rows [a, b) of this sequence's vision features used by tokens start..end-1
        (feature row r replaces the embedding of token vision_token_idx[r])."""
        return bisect.bisect_left(self.vision_token_idx, start), bisect.bisect_left(self.vision_token_idx, end)
