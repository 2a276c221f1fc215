"""Training examples and their order: which turn of a conversation becomes (history, query, answer), and
which examples each rank sees at each step. Both are pure functions of (seed, epoch, index), so a
resumed run sees exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from ..processing import Processor
from ..processing.prompt import ModelInputs
from .data import Conversation

HISTORY_MODES = ("official", "full", "none")


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


class FinetuneDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> labelled ModelInputs (labels = answer ids + EOS, built by the core processor)."""

    def __init__(self, conversations: Sequence[Conversation], processor: Processor, seed: int,
                 history: str = "official", template: str | None = None):
        self.conversations = list(conversations)
        self.processor = processor
        self.seed, self.history, self.template = seed, history, template

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, key: tuple[int, int]) -> ModelInputs:
        epoch, index = key
        conv = self.conversations[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds hash deterministically
        past, query, answer = sample_turn(conv.turns, rng, self.history)
        return self.processor(query, past, image=conv.image, video=conv.video, template=conv.template or self.template,
                              answer=answer)


class EpochOrder:
    """Shuffled micro-batches of example indices for one rank.

    Epoch e's order is randperm(n) under seed + e; it is cut into micro-batches of `batch_size`, the
    tail that does not fill a micro-batch on every rank is dropped, and rank r takes every
    world_size-th micro-batch starting at r.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} examples cannot fill one micro-batch of {batch_size} on each of {world_size} rank(s)")

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches one rank gets per epoch."""
        return self.n // (self.batch_size * self.world_size)

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
