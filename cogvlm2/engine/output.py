"""OutputProcessor: sampled ids -> RequestOutput: incremental text, stop ids / strings, length limits.

Stop semantics equal `generation.stream_text`: a stop id (EOS unless ignore_eos, or one of
stop_token_ids) ends the request and stays in token_ids but adds no text; text that might be the
start of a stop string is held back until it can't be; a stop string is cut from the text together
with everything after it. "length" means max_new_tokens, max_model_len (prompt + generated tokens)
or the model's max_position_embeddings was reached.
"""

from __future__ import annotations

import time

from ..processing.detokenizer import IncrementalDetokenizer
from ..processing.tokenizer import Tokenizer
from .protocol import RequestOutput
from .sequence import Sequence


class _TextState:
    def __init__(self, tokenizer: Tokenizer | None, seq: Sequence, eos_token_ids: tuple[int, ...]):
        params = seq.params
        self.stop_ids = params.stop_ids(eos_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.stops = params.stop
        self.hold = max((len(s) for s in params.stop), default=0)
        self.held = ""  # decoded text not emitted yet: it may begin a stop string
        self.text = ""
        self.num_tokens_sent = 0

    def push(self, token: int) -> tuple[str, str | None]:
        """Feed a token; returns (text to emit now, the stop string found or None)."""
        if self.detok is None:
            return "", None
        self.held += self.detok.push(token)
        return self._emit(final=False)

    def flush(self) -> str:
        if self.detok is None:
            return ""
        self.held += self.detok.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, str | None]:
        found = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if found:
            cut, stop = min(found)
            out, self.held = self.held[:cut], ""
            return out, stop
        keep = 0 if final else max(self.hold - 1, 0)
        cut = max(len(self.held) - keep, 0)
        out, self.held = self.held[:cut], self.held[cut:]
        return out, None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int,
                 max_position_embeddings: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.max_position_embeddings = max_position_embeddings
        self.states: dict[str, _TextState] = {}

    def add(self, seq: Sequence) -> None:
        if seq.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.states[seq.request_id] = _TextState(self.tokenizer, seq, self.eos_token_ids)

    def process(self, seq: Sequence, token: int) -> RequestOutput:
        """After `token` was appended to seq: decide whether it finished, and report the change."""
        state = self.states[seq.request_id]
        delta = ""
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = time.monotonic()
        if token in state.stop_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            delta, stop = state.push(token)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
            elif self.at_length_limit(seq, len(seq)):
                seq.finish_reason = "length"
        if seq.finish_reason is not None and not isinstance(seq.stop_reason, str):
            delta += state.flush()  # the end: release held-back text (a stop string was cut already)
        return self._output(seq, state, delta)

    def at_length_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` holding num_tokens tokens (prompt included) is done by length, whatever the
        value of its last token (the async scheduler asks this about a token still on the device)."""
        num_output = num_tokens - seq.num_prompt_tokens
        return (num_output >= seq.params.max_new_tokens or num_tokens >= self.max_model_len
                or seq.next_position + num_output - 1 >= self.max_position_embeddings)

    def abort(self, seq: Sequence) -> RequestOutput:
        seq.finish_reason = "abort"
        return self._output(seq, self.states[seq.request_id], "")

    def _output(self, seq: Sequence, state: _TextState, delta: str) -> RequestOutput:
        finished = seq.finish_reason is not None
        state.text += delta
        ids = seq.output_ids
        out = RequestOutput(
            request_id=seq.request_id, prompt_len=seq.num_prompt_tokens, token_ids=ids, text=state.text,
            delta_token_ids=ids[state.num_tokens_sent:], delta_text=delta, finished=finished,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, num_cached_tokens=seq.num_cached_tokens,
            metrics=seq.metrics)
        state.num_tokens_sent = len(ids)
        if finished:
            seq.metrics.finished_time = time.monotonic()
            del self.states[seq.request_id]
        return out
