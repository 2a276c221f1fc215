"""Training examples and their order: which turn of a conversation becomes (history, query, answer), and
which examples each rank sees at each step. Both are pure functions of (seed, epoch, index), so a
resumed run sees exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from ..processing import Processor
from ..processing.prompt import VISION, ModelInputs, position_ids
from .data import Conversation, DataError

HISTORY_MODES = ("official", "full", "none")
# What happens to an example longer than --max-length (after its oldest history rounds are dropped):
#   truncate: cut the prompt text from the left (oldest first), then, if the answer alone is too long,
#             the answer's end: every example still trains on answer tokens
#   drop:     skip the example (counted and reported)
#   error:    stop with the example's file
OVERLONG = ("truncate", "drop", "error")
KEEP_PROMPT = 8  # prompt tokens kept before an answer that has to be cut ("... Answer:")
# Per-example outcome, counted and reported by the trainer
FIT, HISTORY_CUT, TRUNCATED, DROPPED = "fit", "history_cut", "truncated", "dropped"


def sample_turn(turns: Sequence[tuple[str, str]], rng: random.Random, history: str = "official"
                ) -> tuple[list[tuple[str, str]], str, str]:
    """Pick one round k of a multi-turn conversation -> (history, query, answer).

    "official" is the CogVLM2 demo's rule: k uniform, and the single round before it as history with
    probability 1/2. "full": every round before k. "none": no history.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
    k = rng.randint(0, len(turns) - 1)
    if history == "full":
        past = list(turns[:k])
    elif history == "official" and k > 0 and rng.random() > 0.5:
        past = [turns[k - 1]]
    else:
        past = []
    query, answer = turns[k]
    return past, query, answer


def cut_to(x: ModelInputs, max_length: int) -> ModelInputs:
    """An example longer than `max_length` -> one that fits and still has answer tokens.

    Kept: BOS and the media tokens; then the end of the prompt text (its start goes first, so
    "... Answer:" stays); then the answer, whose end is cut only when the answer alone is too long.
    """
    media_end = max((i + 1 for i, t in enumerate(x.token_type_ids) if t == VISION), default=1)
    answer_start = next(i for i, label in enumerate(x.labels) if label != -100)
    head, text = media_end, answer_start - media_end
    if head + 1 >= max_length:
        raise ValueError(f"max_length {max_length} leaves no room after the {head} BOS + media tokens")
    keep_text = min(text, max(0, max_length - head - (len(x) - answer_start)))
    if keep_text < min(text, KEEP_PROMPT):  # the answer alone does not fit: keep a little prompt, cut its end
        keep_text = min(text, KEEP_PROMPT, max_length - head - 1)
    keep = list(range(head)) + list(range(answer_start - keep_text, answer_start))
    keep += list(range(answer_start, answer_start + max_length - len(keep)))
    types = [x.token_type_ids[i] for i in keep]
    return ModelInputs([x.input_ids[i] for i in keep], types, position_ids(types), x.pixel_values, x.vision_hash,
                       [x.labels[i] for i in keep], x.prompt_text)


class FinetuneDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> (labelled ModelInputs, outcome); labels = answer ids + EOS (the core processor's).

    With `max_length`, an example that is too long first loses its oldest history rounds; if it still
    does not fit, `overlong` decides (OVERLONG). The outcome (FIT, HISTORY_CUT, TRUNCATED, DROPPED)
    travels with the example so the trainer can count it, whatever process built it.
    """

    def __init__(self, conversations: Sequence[Conversation], processor: Processor, seed: int,
                 history: str = "official", template: str | None = None, max_length: int | None = None,
                 overlong: str = "truncate"):
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        self.conversations = list(conversations)
        self.processor = processor
        self.seed, self.history, self.template = seed, history, template
        self.max_length, self.overlong = max_length, overlong

    def __len__(self) -> int:
        return len(self.conversations)

    def build(self, conv: Conversation, past: list, query: str, answer: str) -> ModelInputs:
        if conv.system:  # before the first query the prompt shows, as the server does
            if past:
                past = [(f"{conv.system}\n{past[0][0]}", past[0][1])] + list(past[1:])
            else:
                query = f"{conv.system}\n{query}"
        return self.processor(query, past, image=conv.image, video=conv.video,
                              template=conv.template or self.template, answer=answer)

    def __getitem__(self, key: tuple[int, int]) -> tuple[ModelInputs, str]:
        epoch, index = key
        conv = self.conversations[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds hash deterministically
        past, query, answer = sample_turn(conv.turns, rng, self.history)
        x = self.build(conv, past, query, answer)
        limit = self.max_length
        if limit is None or len(x) <= limit:
            return x, FIT
        if self.overlong == "error":
            raise DataError(f"{conv.source}: {len(x)} tokens (media included) exceed --max-length {limit} "
                            "(--overlong truncate / drop handle such examples)")
        while past and len(x) > limit:  # oldest rounds first
            past = past[1:]
            x = self.build(conv, past, query, answer)
        if len(x) <= limit:
            return x, HISTORY_CUT
        if self.overlong == "drop":  # kept only as a no-target stand-in, for a micro-batch dropped whole
            x = cut_to(x, limit)
            return ModelInputs(x.input_ids, x.token_type_ids, x.position_ids, x.pixel_values, x.vision_hash,
                               [-100] * len(x), x.prompt_text), DROPPED
        return cut_to(x, limit), TRUNCATED


class EpochOrder:
    """Shuffled micro-batches of example indices for one rank.

    Epoch e's order is randperm(n) under seed + e; it is cut into micro-batches of `batch_size`, the
    tail that does not fill a micro-batch on every rank is left out of that epoch (`unused_per_epoch`
    examples; the order changes each epoch, so they train in others), and rank r takes every
    world_size-th micro-batch starting at r.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} training examples cannot fill one micro-batch of {batch_size} on each of "
                             f"{world_size} rank(s): lower --batch-size or add data")

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches one rank gets per epoch."""
        return self.n // (self.batch_size * self.world_size)

    @property
    def unused_per_epoch(self) -> int:
        return self.n - self.batches_per_epoch * self.batch_size * self.world_size

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of epoch `epoch`, as lists of dataset keys (epoch, index)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.n))
        b = self.batch_size
        batches = [order[i:i + b] for i in range(0, self.batches_per_epoch * self.world_size * b, b)]
        return [[(epoch, i) for i in batch] for batch in batches[self.rank::self.world_size]]

    def stream(self, first: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """(epoch, micro-batch) from global micro-batch number `first` on, forever."""
        epoch, offset = divmod(first, self.batches_per_epoch)
        while True:
            for batch in self.epoch(epoch)[offset:]:
                yield epoch, batch
            epoch, offset = epoch + 1, 0


def eval_batches(n: int, batch_size: int, rank: int, world_size: int, limit: int | None = None
                 ) -> tuple[list[list[tuple[int, int]]], int]:
    """Every held-out example exactly once, in order: (this rank's micro-batches, how many are real).

    The last micro-batch may be short. Ranks get the same number of micro-batches (sharded models run
    forward passes collectively); a rank with fewer real ones repeats its first (or the global first)
    as padding, which the evaluation runs but does not count. `limit`: micro-batches per rank.
    """
    if n < 1:
        raise ValueError("the held-out set is empty")
    batches = [[(0, i) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    if limit is not None:
        batches = batches[:limit * world_size]
    mine = batches[rank::world_size]
    per_rank = -(-len(batches) // world_size)
    real = len(mine)
    return mine + [(mine or batches)[0]] * (per_rank - real), real
