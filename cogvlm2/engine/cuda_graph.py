"""CUDA graphs of the pure-decode forward at bucketed batch sizes (nano-vllm style), CUDA only.

A decode step is plain Llama (every token a language token), so its shapes depend on the batch size
alone once the block table is padded to max_blocks_per_seq. We capture one graph per bucket over
static input buffers, largest first, sharing one memory pool. A batch of n sequences runs in the
smallest bucket >= n: rows past n are padding that writes its K/V into the null block and attends
to it only (context length 1). With capture=False every bucket runs eagerly over the same static
buffers: the padding and buffer logic then runs (and is tested) on the CPU.
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
        if device.type == "cuda":
            self._staging = torch.empty(max_bs * (4 + self.width), dtype=torch.long).pin_memory()
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

    def run(self, rows: tuple[list[int], list[int], list[int], list[int], list[list[int]]]) -> torch.Tensor:
        """rows = (ids, positions, slots, context lens, block tables) of n sequences -> hidden [n, D]."""
        ids, pos, slots, context, tables = rows
        n = len(ids)
        bs = next(s for s in self.sizes if s >= n)
        pad = bs - n
        null_slot = self.null_block * self.block_size
        # Only the columns some sequence uses travel: the kernels never read a table past its context
        # length, so stale entries further right are harmless. Pad rows attend to the null block.
        w = max(len(t) for t in tables)
        flat_tables = itertools.chain.from_iterable(t + [self.null_block] * (w - len(t)) for t in tables)
        host = torch.tensor(list(itertools.chain(
            ids, [0] * pad, pos, [0] * pad, slots, [null_slot] * pad,
            context, [1] * pad, flat_tables, [self.null_block] * (pad * w))), dtype=torch.long)
        device = self.input_ids.device
        if device.type == "cuda":  # reuse one pinned staging buffer: the previous step has synced
            staged = self._staging[:host.numel()]
            staged.copy_(host)
            host = staged
        dev = host.to(device, non_blocking=True)
        ids_d, pos_d, slots_d, ctx_d, tables_d = dev.split([bs, bs, bs, bs, bs * w])
        self.input_ids[:bs].copy_(ids_d)
        self.positions[:bs].copy_(pos_d)
        self.slot_mapping[:bs].copy_(slots_d)
        self.context_lens[:bs].copy_(ctx_d)
        self.block_tables[:bs, :w].copy_(tables_d.view(bs, w))
        return self.replay[bs]()[:n]
