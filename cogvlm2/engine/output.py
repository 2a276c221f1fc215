"""OutputProcessor: sampled ids -> RequestOutput: stop ids and length limits (the engine never sees text).

A stop id (EOS unless ignore_eos, or one of stop_token_ids) ends the request and stays in token_ids.
"length" means max_new_tokens, max_model_len (prompt + generated tokens) or the model's
max_position_embeddings was reached. Text, detokenization and stop strings belong to the front-end
(`cogvlm2.llm`), which aborts a request whose text meets a stop string.
"""

from __future__ import annotations

import time

from .protocol import RequestOutput
from .sequence import Sequence


class OutputProcessor:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int, max_position_embeddings: int):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.max_position_embeddings = max_position_embeddings
        self.states: dict[str, tuple[set[int], list[int]]] = {}  # request id -> (stop ids, [ids sent])

    def add(self, seq: Sequence) -> None:
        self.states[seq.request_id] = (seq.params.stop_ids(self.eos_token_ids), [0])

    def process(self, seq: Sequence, token: int) -> RequestOutput:
        """After `token` was appended to seq: decide whether it finished, and report the change."""
        stop_ids, _ = self.states[seq.request_id]
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = time.monotonic()
        if token in stop_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif self.at_length_limit(seq, len(seq)):
            seq.finish_reason = "length"
        return self._output(seq)

    def at_length_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` holding num_tokens tokens (prompt included) is done by length, whatever the
        value of its last token (the async scheduler asks this about a token still on the device)."""
        num_output = num_tokens - seq.num_prompt_tokens
        return (num_output >= seq.params.max_new_tokens or num_tokens >= self.max_model_len
                or seq.next_position + num_output - 1 >= self.max_position_embeddings)

    def abort(self, seq: Sequence) -> RequestOutput:
        seq.finish_reason = "abort"
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.finish_reason is not None
        _, sent = self.states[seq.request_id]
        ids = seq.output_ids
        out = RequestOutput(
            request_id=seq.request_id, prompt_len=seq.num_prompt_tokens, token_ids=ids,
            delta_token_ids=ids[sent[0]:], finished=finished, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, num_cached_tokens=seq.num_cached_tokens, metrics=seq.metrics)
        sent[0] = len(ids)
        if finished:
            seq.metrics.finished_time = time.monotonic()
            del self.states[seq.request_id]
        return out
