"""Scheduler: admission (FCFS), chunked prefill under a token budget, decode, preemption by recompute.

Every step gives each scheduled sequence a number of tokens to compute: running sequences first
(a decode is 1 token, an unfinished prefill the next chunk), then waiting ones in arrival order,
all within `max_num_batched_tokens`. When the KV pool runs dry, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
prefilled again later (prompt + generated tokens, prefix cache permitting). The oldest running
sequence can always make progress because one sequence of max_model_len fits in the pool.

Async scheduling adds `schedule_lookahead`: the next step is built before the previous step's sampled ids
reach the host. Each running sequence that sampled in it decodes the id still on the device, each one in the
middle of its prefill computes its next chunk (its tokens are on the host), and waiting sequences are admitted
as `schedule` admits them. It never preempts; whenever it would have to (or a running sequence sat out the
previous step) it declines and the engine falls back to `schedule` after collecting the previous step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step: seqs[i] computes tokens starts[i] : starts[i] + num_new_tokens[i] and, when
    samples[i], samples its next token from the last of them.

    A lookahead batch (input_rows set) is launched before the previous step was collected. Where
    input_rows[i] is a row, seqs[i] decodes: token starts[i] == len(seqs[i]) is not in token_ids yet;
    it is that row of the previous step's sampled ids, which the runner reads on the device. Where it
    is None, seqs[i] was admitted into this step and its tokens are on the host.

    kv_copies: (source block, destination block, rows) whose first rows' K/V the step copies before
    anything else (prefix-cache tail hits: BlockManager.lookup_tail)."""

    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    input_rows: list[int] | None = None
    kv_copies: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, seq: Sequence, n: int, start: int | None = None) -> None:
        """seq computes n tokens from `start` (None: from its computed ones; a lookahead step continues a prefill
        from where the step in flight leaves it)."""
        start = seq.num_computed_tokens if start is None else start
        self.seqs.append(seq)
        self.starts.append(start)
        self.num_new_tokens.append(n)
        self.samples.append(start + n == len(seq))
        if self.input_rows is not None:
            self.input_rows.append(None)  # its tokens are on the host

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes one token that it samples from (CUDA-graph shaped)."""
        return all(n == 1 for n in self.num_new_tokens) and all(self.samples)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for stats and tests

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, n, batch):
                break  # seq itself was preempted: everything after it too
            batch.add(seq, n)
            budget -= n
            i += 1
        self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Waiting sequences in arrival order into batch, within budget tokens and max_num_seqs, while the
        pool holds them without preempting."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            prefix = self.blocks.lookup(seq)
            tail = self.blocks.lookup_tail(seq, prefix)
            computed = len(prefix) * self.blocks.block_size + (tail[1] if tail else 0)
            n = min(len(seq) - computed, budget)
            if not self.blocks.allocate(seq, n, prefix, tail):
                break
            if tail:
                batch.kv_copies.append((tail[0], seq.block_table[len(prefix)], tail[1]))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = computed
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n

    def schedule_lookahead(self, prev: ScheduledBatch, done: Callable[[Sequence], bool]) -> ScheduledBatch | None:
        """The step after `prev`, built before prev's sampled ids reach the host: every running sequence that
        sampled in prev decodes that id, every one in the middle of its prefill computes its next chunk (as
        `schedule` would once prev is applied), then waiting sequences are admitted with the tokens left of the
        budget (as `schedule` admits them, never preempting). None (and nothing changed) unless
          - every running sequence was in prev (none left out by the budget),
          - the pool holds the next token of every decoding sequence and the next chunk of every prefilling
            one without preempting,
          - the step has work: a running sequence to decode or prefill, or a waiting one admitted.
        A sequence for which done(seq) (prev's token ends it whatever its value: a length limit)
        sits out. One that prev's token stops (EOS, stop string) cannot be foreseen: it decodes one
        token too many, which the engine discards."""
        rows = {id(s): i for i, s in enumerate(s for s, sample in zip(prev.seqs, prev.samples) if sample)}
        resume = {id(s): start + n for s, start, n, sample in zip(prev.seqs, prev.starts, prev.num_new_tokens,
                                                                   prev.samples) if not sample}
        if any(id(s) not in rows and id(s) not in resume for s in self.running) or not (self.running or self.waiting):
            return None
        decoding = [s for s in self.running if id(s) in rows and not done(s)]
        budget = self.config.max_num_batched_tokens - len(decoding)
        if budget < 0:
            return None
        chunks = []  # (seq, start, n) of the prefills in progress, in running order, within the budget
        for s in self.running:
            if id(s) in resume and budget > 0:
                n = min(len(s) - resume[id(s)], budget)
                chunks.append((s, resume[id(s)], n))
                budget -= n
        grow = [(s, len(s) + 1) for s in decoding if not self._holds(s, len(s) + 1)]  # typically one in block_size
        grow += [(s, start + n) for s, start, n in chunks if not self._holds(s, start + n)]
        if sum(self.blocks.blocks_needed(t) - len(s.block_table) for s, t in grow) > self.blocks.num_free:
            return None
        for seq, t in grow:
            ok = self.blocks.allocate(seq, t - seq.num_computed_tokens)
            assert ok, "lookahead allocation was checked"
        n = len(decoding)
        batch = ScheduledBatch(list(decoding), [len(s) for s in decoding], [1] * n, [True] * n,
                               input_rows=[rows[id(s)] for s in decoding])  # a copy: add() and _admit() append
        for seq, start, k in chunks:
            batch.add(seq, k, start)
        self._admit(batch, budget)
        if not decoding:  # prefill chunks and admitted sequences only: nothing reads the previous step's ids
            batch.input_rows = None
        return batch if batch.seqs else None

    def _holds(self, seq: Sequence, num_tokens: int) -> bool:
        """seq's blocks already cover its first num_tokens tokens (allocate would be a no-op)."""
        return len(seq.block_table) * self.blocks.block_size >= num_tokens

    def _allocate_or_preempt(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        if self._holds(seq, seq.num_computed_tokens + n):  # the common decode step: nothing to allocate
            return True
        while not self.blocks.allocate(seq, n):
            victim = self.running.pop()  # the newest; never one already scheduled this step
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """After the step ran: advance progress, append sampled tokens, hash newly full blocks.
        Sequences that finished (or were aborted) while the step was in flight are skipped: their
        token is stale and their blocks are gone."""
        for seq, start, n, token in zip(batch.seqs, batch.starts, batch.num_new_tokens, sampled):
            if seq.is_finished:
                continue
            assert start == seq.num_computed_tokens, f"{seq} updated out of order (step start {start})"
            seq.num_computed_tokens += n
            if token is not None:
                seq.token_ids.append(token)
            self.blocks.commit(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence (running or waiting) and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SequenceStatus.FINISHED

    def pending_vision(self) -> set[str]:
        """Vision hashes some unfinished sequence still has to prefill (their features stay cached)."""
        return {s.vision_hash for q in (self.running, self.waiting) for s in q if s.has_pending_vision}
