"""Tensor parallelism: one rank's view of the process group, its vocab-parallel embedding, and which slice
of each official checkpoint tensor it holds.

Megatron-style sharding of the language model and its visual expert over N ranks (N divides the 8 KV heads):

- fused QKV (language and vision expert, weight and bias): column-parallel by heads. Rank r holds query
  heads [r Hq/N, (r+1) Hq/N) and KV heads [r Hkv/N, (r+1) Hkv/N), so every GQA group (Hq/Hkv query heads
  sharing one KV head) stays on one rank and attention needs no communication; the KV cache holds
  Hkv/N heads per rank.
- attention dense and MLP down_proj: row-parallel (input features split); their partial sums are reduced
  by ONE all-reduce per sub-layer, after both experts have run (`route` fills one output, then it is
  reduced), so an image prompt costs no more collectives than a text one.
- MLP gate/up: column-parallel (intermediate features split); silu(gate) * up is elementwise per shard.
- embed_tokens: vocab-parallel (rows split; out-of-shard ids give zeros; one all-reduce).
- lm_head: vocab-parallel columns; the logits are all-gathered so that every rank holds all [B, V] and runs
  the same sampler on the same numbers (see `ParallelContext.sync_rng`): no token broadcast, no rank-0-only
  path. Gathering to rank 0 instead would need a broadcast of the chosen tokens back (a second collective
  and a host sync per step) for the same bytes; the gather is B x V floats (0.5 MB per row).
- the vision tower is replicated (every rank encodes the images; its output is identical on every rank),
  or with `shard_vision` its transformer is sharded the same way (QKV by its 16 heads and fc1
  column-parallel, dense and fc2 row-parallel: two all-reduces per tower layer; `vision.py`).

Parameter names stay the official keys (only shapes shrink), so the strict key check of the loader holds;
`shard_slicer` tells the loader which slice of each key a rank reads (safetensors `get_slice`: the full
tensor is never read).

All communication is `torch.distributed` on an explicit group: NCCL on GPUs (in-place all-reduce, which
CUDA graphs capture; the small all-reduces of decode go through a one-shot peer-to-peer kernel over
symmetric memory once `use_peer_all_reduce` is called, `peer_all_reduce.py`) and gloo on the CPU (the
multi-process tests). Inference only: the collectives are not differentiable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import TensorSlice
from ..config import ModelConfig
from .peer_all_reduce import DEFAULT_MAX_BYTES, PeerAllReduce

__all__ = ["ParallelContext", "VocabParallelEmbedding", "shard_slicer", "tp_size"]

# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True, eq=False)
class ParallelContext:
    """rank / world_size of one tensor-parallel group and the torch.distributed group that links them.

    Passed explicitly to the model (`load_model(..., tensor_parallel=ctx)`); nothing is global. `group`
    None means the default group (world_size must then equal the default group's size).
    """

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None
    shard_vision: bool = False  # shard the vision tower's transformer too (else every rank holds it whole)
    peer: "PeerAllReduce | None" = field(default=None, init=False, repr=False)  # see use_peer_all_reduce

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of world size {self.world_size}")
        if self.world_size > 1:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("tensor parallelism needs torch.distributed initialised first "
                                   "(ParallelContext.from_env() does it under torchrun)")
            size = dist.get_world_size(self.group)
            if size != self.world_size or dist.get_rank(self.group) != self.rank:
                raise ValueError(f"ParallelContext(rank={self.rank}, world_size={self.world_size}) disagrees with "
                                 f"the process group (rank {dist.get_rank(self.group)} of {size})")

    @classmethod
    def from_env(cls, backend: str | None = None, timeout_s: float = 600.0) -> "ParallelContext":
        """Join the group torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) describes.

        backend None: "nccl" when CUDA is available (each rank takes GPU LOCAL_RANK), else "gloo". The global
        RNG is then seeded identically on every rank (`sync_rng`), so sampling agrees across ranks.
        """
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"tensor parallelism needs the launcher's environment (torchrun); missing {missing}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device_id = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
        ctx = cls(dist.get_rank(), dist.get_world_size())
        ctx.sync_rng()
        return ctx

    @property
    def device(self) -> torch.device:
        """This rank's device: its GPU under NCCL, the CPU under gloo (or without a group)."""
        if self.world_size > 1 and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, n: int, what: str) -> int:
        """n / world_size, or a clear error naming what does not divide."""
        if n % self.world_size:
            raise ValueError(f"tensor parallel size {self.world_size} must divide {what} ({n})")
        return n // self.world_size

    def check(self, cfg: ModelConfig) -> None:
        check_sizes(cfg, self.world_size, self.shard_vision)

    def use_peer_all_reduce(self, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
        """From now on, all-reduce messages of `dtype` up to max_bytes with the one-shot peer-to-peer
        kernel (`peer_all_reduce.py`), the rest with NCCL. Collective (every rank calls it); GPUs only.
        False (NCCL for everything, with a warning) where the GPUs cannot map each other's memory."""
        if self.world_size == 1 or self.device.type != "cuda":
            return False
        object.__setattr__(self, "peer", PeerAllReduce.try_build(self.group, self.device, dtype, max_bytes))
        return self.peer is not None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (what CUDA graphs capture); x is returned."""
        if self.world_size > 1:
            if self.peer is not None and self.peer.takes(x):
                return self.peer(x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' x concatenated along dim in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))  # one buffer, one collective
        _all_gather_single(out, x, group=self.group)
        return torch.cat(out.view(self.world_size, *x.shape).unbind(0), dim=dim)

    def broadcast_object(self, obj, src: int = 0):
        """obj as rank `src` holds it (a host object: prompts, seeds)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, src) if self.group else src,
                                   group=self.group)
        return box[0]

    def sync_rng(self) -> int:
        """Seed torch's global RNG (CPU and CUDA) with one seed drawn on rank 0.

        Every rank runs the same sampling ops on the same gathered logits in the same order, so with equal
        RNG states unseeded sampling picks the same tokens everywhere (a seeded request uses its own
        generator and needs nothing). Returns the seed.
        """
        seed = self.broadcast_object(int(torch.randint(0, 2**62, ()).item()))
        torch.manual_seed(seed)
        return seed


def check_sizes(cfg: ModelConfig, world_size: int, shard_vision: bool = False) -> None:
    """Every sharded dimension of the model divides by world_size (KV heads: 8 in the official models,
    so N = 1, 2, 4, 8), or a ValueError naming the one that does not."""
    dims = [(cfg.num_key_value_heads, "the number of KV heads"),
            (cfg.num_attention_heads, "the number of attention heads"),
            (cfg.intermediate_size, "intermediate_size"), (cfg.vocab_size, "vocab_size")]
    if shard_vision:
        dims += [(cfg.vision.num_heads, "the vision tower's heads"),
                 (cfg.vision.intermediate_size, "the vision tower's intermediate_size")]
    for n, what in dims:
        if n % world_size:
            raise ValueError(f"tensor parallel size {world_size} must divide {what} ({n})")


def tp_size(ctx: ParallelContext | None) -> int:
    return 1 if ctx is None else ctx.world_size


class VocabParallelEmbedding(nn.Module):
    """embed_tokens with rows [rank V/N, (rank+1) V/N) on each rank; `weight` keeps the official name.

    Ids outside the rank's rows give zero rows and one all-reduce sums the ranks' results: each id's row comes
    from exactly one rank and the others add exact zeros, so the embedding equals the unsharded one bit for bit.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.rows = ctx.shard(num_embeddings, "vocab_size")
        self.start = ctx.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)  # [N, D]
        out = out.masked_fill(outside[:, None], 0)
        return self.ctx.all_reduce(out)


# (pattern, dim, kind) for the sharded official keys; every other key (norms, the vision tower) is replicated.
_SHARDED = [
    (re.compile(r"^model\.embed_tokens\.weight$"), 0, "rows"),
    (re.compile(r"^lm_head\.weight$"), 0, "rows"),
    (re.compile(r"^model\.layers\.\d+\.self_attn\.(language|vision)_expert_query_key_value\.(weight|bias)$"), 0, "qkv"),
    (re.compile(r"^model\.layers\.\d+\.self_attn\.(language|vision)_expert_dense\.weight$"), 1, "rows"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.(language|vision)_mlp\.(gate|up)_proj\.weight$"), 0, "rows"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.(language|vision)_mlp\.down_proj\.weight$"), 1, "rows"),
]
# the vision tower's transformer, with shard_vision (row-parallel biases stay whole: added once after the reduce)
_VISION = "^model\\.vision\\.transformer\\.layers\\.\\d+\\."
_SHARDED_VISION = [
    (re.compile(_VISION + r"attention\.query_key_value\.(weight|bias)$"), 0, "vision_qkv"),
    (re.compile(_VISION + r"attention\.dense\.weight$"), 1, "rows"),
    (re.compile(_VISION + r"mlp\.fc1\.(weight|bias)$"), 0, "rows"),
    (re.compile(_VISION + r"mlp\.fc2\.weight$"), 1, "rows"),
]


def qkv_ranges(cfg: ModelConfig, ctx: ParallelContext) -> list[tuple[int, int]]:
    """Rows of the fused [q; k; v] projection that rank holds: its query heads, then its KV heads' k and v."""
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q_local, kv_local = ctx.shard(hq, "the number of attention heads"), ctx.shard(hkv, "the number of KV heads")
    q0, k0 = ctx.rank * q_local * d, hq * d + ctx.rank * kv_local * d
    v0 = hq * d + hkv * d + ctx.rank * kv_local * d
    return [(q0, q0 + q_local * d), (k0, k0 + kv_local * d), (v0, v0 + kv_local * d)]


def shard_slicer(cfg: ModelConfig, ctx: ParallelContext):
    """key, full shape -> the `TensorSlice` rank `ctx.rank` reads, or None for a replicated tensor."""
    ctx.check(cfg)
    qkv = qkv_ranges(cfg, ctx)
    dv = cfg.vision.hidden_size // ctx.world_size  # the vision heads' rows of each of q, k, v
    vision_qkv = [(part * cfg.vision.hidden_size + ctx.rank * dv, part * cfg.vision.hidden_size + (ctx.rank + 1) * dv)
                  for part in range(3)]
    patterns = _SHARDED + (_SHARDED_VISION if ctx.shard_vision else [])

    def slicer(key: str, shape: tuple[int, ...]) -> TensorSlice | None:
        if ctx.world_size == 1:
            return None
        for pattern, dim, kind in patterns:
            if pattern.search(key):
                if kind in ("qkv", "vision_qkv"):
                    return TensorSlice(dim, qkv if kind == "qkv" else vision_qkv)
                n = ctx.shard(shape[dim], f"dim {dim} of {key}")
                return TensorSlice(dim, [(ctx.rank * n, (ctx.rank + 1) * n)])
        return None

    return slicer
