"""CUDA graphs of the pure-decode forward at bucketed batch sizes (nano-vllm style), CUDA only.

A decode step is plain Llama (every token a language token), so its shapes depend on the batch size
alone once the block table is padded to max_blocks_per_seq. We capture one graph per bucket over
static input buffers, largest first, sharing one memory pool. A batch of n sequences runs in the
smallest bucket >= n: rows past n are padding that writes its K/V into the null block and attends
to it only (context length 1). With capture=False every bucket runs eagerly over the same static
buffers: the padding and buffer logic then runs (and is tested) on the CPU.

The block tables persist on the device between steps and only the entries that changed travel: in
steady decode a row gains one block every block_size steps, so at long contexts the host no longer
rebuilds and copies [batch, blocks] ids per step. Under async scheduling the input ids of a step may
be the previous step's sampled ids, still on the device: they are copied there into the static
input_ids buffer and never visit the host.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from ..model.batch import ForwardBatch
from ..model.cogvlm import CogVLM2ForCausalLM
from .attention import Attend, AttentionMetadata, KVCache, PagedAttention, attend_decode_batched, attend_reference
from .config import EngineConfig

GATHER_WORKSPACE_BYTES = 1 << 30  # the reference decode gathers whole block tables: cap its buckets
NUM_STAGING_BUFFERS = 2  # pinned host staging buffers, used in turn (see `run`)

# (ids, positions, slots, context lens, block tables) of a pure-decode batch, one row per sequence;
# ids is a host list or, for a lookahead step, a device tensor
DecodeRows = tuple[list[int] | torch.Tensor, list[int], list[int], list[int], list[list[int]]]


class DecodeGraphs:
    def __init__(self, model: CogVLM2ForCausalLM, cache: KVCache, config: EngineConfig, attend: Attend,
                 capture: bool = True):
        cfg, device = model.config, model.device
        self.width = config.max_blocks_per_seq
        self.block_size = config.block_size
        self.null_block = cache.null_block
        sizes = list(config.cuda_graph_batch_sizes)
        if attend in (attend_reference, attend_decode_batched):
            per_seq = 2 * self.width * config.block_size * cfg.num_attention_heads * cfg.head_dim * cache.kv.element_size()
            sizes = [s for s in sizes if s * per_seq <= GATHER_WORKSPACE_BYTES] or sizes[:1]
        self.sizes = sorted(sizes)
        max_bs = self.sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), self.null_block * self.block_size, dtype=torch.long, device=device)
        self.context_lens = torch.ones(max_bs, dtype=torch.long, device=device)
        self.block_tables = torch.full((max_bs, self.width), self.null_block, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.long, device=device)
        self._staging: list[torch.Tensor] = []
        self._turn = 0
        if device.type == "cuda":
            self._staging = [torch.empty(max_bs * (4 + 2 * self.width), dtype=torch.long).pin_memory()
                             for _ in range(NUM_STAGING_BUFFERS)]
        self._rows: list[list[int]] = [[] for _ in range(max_bs)]  # a prefix of what each block_tables row holds
        self.replay: dict[int, Callable[[], torch.Tensor]] = {}  # bucket -> run it, return hidden [bucket, D]
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs],
                                         self.query_start_loc[:bs + 1])  # no host lists: graph-safe path
                batch = ForwardBatch(self.input_ids[:bs], self.positions[:bs], PagedAttention(cache, meta, attend))
                if not capture:
                    self.replay[bs] = lambda batch=batch: model(batch)
                    continue
                model(batch)  # warm up (lazy inits, autotuning) outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    hidden = model(batch)
                pool = graph.pool() if pool is None else pool
                self.replay[bs] = lambda graph=graph, hidden=hidden: (graph.replay(), hidden)[1]
                torch.cuda.synchronize()

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def run(self, rows: DecodeRows) -> torch.Tensor:
        """rows = (ids, positions, slots, context lens, block tables) of n sequences -> hidden [n, D].
        ids is a host list, or a device tensor (a lookahead step's ids, which never visit the host)."""
        ids, pos, slots, context, tables = rows
        on_device = isinstance(ids, torch.Tensor)
        n = len(pos)
        bs = next(s for s in self.sizes if s >= n)
        pad = bs - n
        null_slot = self.null_block * self.block_size
        # Pad rows attend to the null block only (context length 1).
        index, blocks, held = self._table_updates(tables + [[self.null_block]] * pad)
        m = len(index)
        host = torch.tensor(list(itertools.chain(
            [0] * n if on_device else ids, [0] * pad, pos, [0] * pad, slots, [null_slot] * pad,
            context, [1] * pad, index, blocks)), dtype=torch.long)
        if self._staging:
            # The step launched just before may not have run yet, so its buffer is busy; the one
            # before it was collected (the engine keeps at most one step in flight), so its copy is done.
            staged = self._staging[self._turn][:host.numel()]
            self._turn = (self._turn + 1) % len(self._staging)
            staged.copy_(host)
            host = staged
        dev = host.to(self.input_ids.device, non_blocking=True)
        ids_d, pos_d, slots_d, ctx_d, index_d, blocks_d = dev.split([bs, bs, bs, bs, m, m])
        self.input_ids[:bs].copy_(ids_d)
        if on_device:
            self.input_ids[:n].copy_(ids)
        self.positions[:bs].copy_(pos_d)
        self.slot_mapping[:bs].copy_(slots_d)
        self.context_lens[:bs].copy_(ctx_d)
        if m:
            self.block_tables.view(-1).index_copy_(0, index_d, blocks_d)
        self._rows[:bs] = held
        return self.replay[bs]()[:n]

    def _table_updates(self, tables: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
        """What to write so that block_tables row r starts with tables[r]: (flat indices, blocks, the
        rows' new prefixes). A row keeps what earlier steps wrote when that is a prefix of its new
        table, so a steady decode step sends only the blocks its sequences just got. Entries past a
        row's table are stale but never read: the kernels stop at the context length."""
        index, blocks, held = [], [], []
        for r, (new, old) in enumerate(zip(tables, self._rows)):
            if new != old:
                keep = len(old) if len(old) < len(new) and new[:len(old)] == old else 0
                index += range(r * self.width + keep, r * self.width + len(new))
                blocks += new[keep:]
                old = list(new)  # a copy: the block manager appends to the sequence's own list
            held.append(old)
        return index, blocks, held
