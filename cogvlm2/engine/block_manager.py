"""BlockManager: the paged KV pool: blocks, ref counts, the free list (LRU) and prefix-cache hashes.

A block holds `block_size` consecutive tokens of one or more sequences. A FULL block whose K/V is
computed gets a hash chained on its parent block's hash and everything its K/V depends on: token
ids, token types, rotary positions, visual-expert routing, the image/video hash when it holds vision
tokens (every image has the same placeholder ids), and the adapter id (the sequence's LoRA adapter, else
the engine-wide `EngineConfig.adapter_id` of a model loaded with one). Equal hash => equal K/V, so
another sequence may reuse the block instead of recomputing it.

A full block inside which a sequence's vision tokens end (the image's last rows, then text) also gets a TAIL
hash over its rows up to that end: a later prompt with the same image and other text after it finds the
block by it, and its step copies those rows' K/V into a block of its own (`lookup_tail`; the copy is the
runner's, first in the step) instead of recomputing them. What is left for it to compute is plain text,
which runs as decode rows under the CUDA graphs instead of an eager mixed step.

Free blocks sit in `free` (an ordered dict used as an LRU queue): a freed block keeps its hash and
may be revived by a prefix hit until it is handed out again; blocks are handed out from the front,
and freed unhashed blocks go to the front, hashed ones to the back.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence


def block_hash(seq: Sequence, index: int, block_size: int, parent: bytes | None, adapter_id: str | None,
               rows: int | None = None) -> bytes:
    """The hash of block `index` of seq (all its rows), or of its first `rows` rows (a tail hash)."""
    start = index * block_size
    end = start + (block_size if rows is None else rows)
    types = seq.token_types(start, end)
    h = hashlib.blake2b(parent or b"root", digest_size=16)
    if rows is not None:
        h.update(b"tail:%d" % rows)
    h.update(array("q", seq.token_ids[start:end] + seq.positions(start, end) + types).tobytes())
    h.update(bytes(seq.expert_mask(start, end)))
    if any(types):
        h.update(b"vision:" + seq.vision_hash.encode())
    if adapter_id is not None:
        h.update(b"adapter:" + adapter_id.encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 adapter_id: str | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.adapter_id = adapter_id
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}  # hash -> the block holding that content
        self.tail_of: dict[bytes, tuple[int, int]] = {}  # tail hash -> (block, rows) holding those rows
        self.tail_hash_of: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`, leaving at least one token to compute (for logits)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for i in range((len(seq) - 1) // self.block_size):
            block = self.block_of.get(self._hash(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def lookup_tail(self, seq: Sequence, prefix: list[int]) -> tuple[int, int] | None:
        """(block, rows): a cached block whose first `rows` rows hold the K/V of seq's tokens from the end of
        `prefix` (lookup's hits) up to the end of its vision tokens, when that end falls inside the next block and
        text follows it; else None. allocate(seq, n, prefix, tail) then counts those rows as computed, and the
        step must copy them (Runner: ScheduledBatch.kv_copies)."""
        if not self.tail_of or len(seq) <= seq.vision_end:
            return None
        h = self._tail_hash(seq, len(prefix))
        return None if h is None else self.tail_of.get(h)

    def _tail_hash(self, seq: Sequence, i: int) -> bytes | None:
        """The tail hash of seq's block i (its rows up to the end of seq's vision tokens), or None when those do
        not end inside block i."""
        rows = seq.vision_end - i * self.block_size
        if not 0 < rows < self.block_size:
            return None
        parent = self._hash(seq, i - 1) if i else None
        return block_hash(seq, i, self.block_size, parent, seq.adapter_id or self.adapter_id, rows)

    def _hash(self, seq: Sequence, i: int) -> bytes:
        """Hash of the sequence's full block i; the chain is kept on the sequence (full blocks never
        change), so a prompt that waits for several steps is hashed once."""
        chain = seq.hash_chain
        while len(chain) <= i:
            chain.append(block_hash(seq, len(chain), self.block_size, chain[-1] if chain else None,
                                    seq.adapter_id or self.adapter_id))
        return chain[i]

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = (),
                 tail: tuple[int, int] | None = None) -> bool:
        """Give `seq` blocks for its first num_computed + num_new_tokens tokens. `prefix` (from
        lookup, only for a sequence without blocks) is reused and counts as computed, and so do the
        rows of `tail` (from lookup_tail: the caller copies them into block len(prefix)). Returns
        False, changing nothing, when the pool is short."""
        assert not (prefix or tail) or not seq.block_table
        tail_rows = tail[1] if tail else 0
        computed = len(prefix) * self.block_size + tail_rows if prefix or tail else seq.num_computed_tokens
        needed = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(prefix)
        revived = sum(1 for b in prefix if self.ref_count[b] == 0)
        if needed > self.num_free - revived:
            return False
        for b in prefix:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(self.hash_of[b])
        if prefix or tail:
            seq.num_computed_tokens = computed
        for _ in range(max(needed, 0)):
            seq.block_table.append(self._take())
        return True

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:  # evict: its content is about to be overwritten
            del self.block_of[old]
            self.hash_of[block] = None
        old = self.tail_hash_of[block]
        if old is not None:
            del self.tail_of[old]
            self.tail_hash_of[block] = None
        self.ref_count[block] = 1
        return block

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed (call after their K/V was written)."""
        if not self.enable_prefix_caching:
            return
        while (len(seq.block_hashes) + 1) * self.block_size <= seq.num_computed_tokens:
            i = len(seq.block_hashes)
            h = self._hash(seq, i)
            block = seq.block_table[i]
            if h not in self.block_of and self.hash_of[block] is None:
                self.block_of[h] = block
                self.hash_of[block] = h
                self._add_tail(seq, i, block)
            seq.block_hashes.append(h)

    def _add_tail(self, seq: Sequence, i: int, block: int) -> None:
        """A tail hash for full block i of seq when its vision tokens end inside it (see lookup_tail)."""
        h = self._tail_hash(seq, i)
        if h is not None and h not in self.tail_of:
            self.tail_of[h] = (block, seq.vision_end - i * self.block_size)
            self.tail_hash_of[block] = h

    def free_seq(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first, so a prefix outlives its suffix in the LRU)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} freed twice"
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
