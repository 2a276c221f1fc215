"""The token embedding table in host memory, read by the GPU over the bus ("zero-copy"), as llama.cpp keeps its
`token_embd` on the CPU: 1.05 GB less GPU memory for CogVLM2's 128,256 x 4,096 table in bf16 or fp16, whatever the
quantization of the rest (the official int4 checkpoints keep it in fp16).

A step reads only its tokens' rows: 8 KB a token, a few microseconds at batch 1 and ~16 MB for a 2K-token prefill.
The table is page-locked in place (cudaHostRegister, mapped), so a Triton kernel on the GPU gathers the rows through
the device pointer of that mapping: no host sync and no copy issued by the host, so the gather is captured in the
decode CUDA graphs like any kernel. The numbers are the table's own (a copy): `move_embeddings_to_host` changes
where the table lives, not what the model computes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton is optional: CPU installs never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

if triton is not None:
    @triton.jit
    def _gather_rows_kernel(ids_ptr, table_ptr, out_ptr, D, BLOCK: tl.constexpr):
        """out[r, c] = table[ids[r], c] for BLOCK columns of row r (table in mapped host memory)."""
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < D
        token = tl.load(ids_ptr + row).to(tl.int64)
        tl.store(out_ptr + row * D + col, tl.load(table_ptr + token * D + col, mask=ok), mask=ok)

BLOCK = 1024  # columns a program: 2 KB of bf16 read across the bus at once, 4 programs a row of 4,096


def gather_rows(ids: torch.Tensor, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """table[ids] -> [*ids.shape, D] on `device` (CUDA), read by a kernel from `table` (contiguous, host memory
    mapped for the device, or any memory the device can read)."""
    d = table.shape[1]
    flat = ids.reshape(-1).to(device, non_blocking=True)
    out = torch.empty(flat.numel(), d, dtype=table.dtype, device=device)
    if flat.numel():
        with torch.cuda.device(device):
            _gather_rows_kernel[(flat.numel(), triton.cdiv(d, BLOCK))](flat, table, out, d, BLOCK=BLOCK, num_warps=4)
    return out.view(*ids.shape, d)


class HostEmbedding(nn.Module):
    """nn.Embedding whose table stays in host memory: `weight` (the checkpoint's name and values) is a CPU tensor;
    ids on a CUDA device give embeddings on that device (a gather over the bus), ids on the CPU F.embedding."""

    def __init__(self, weight: torch.Tensor, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.device = torch.device(device)  # where the embeddings go (the model's device)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device.type == "cuda":
            return gather_rows(ids, self.weight, ids.device)
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory for {self.device}"


PAGE = 4096


def _page_aligned(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor whose memory starts on a page boundary (what page-locking in place registers)."""
    nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -buf.data_ptr() % PAGE
    return buf[start:start + nbytes].view(dtype).view(shape)


def _register(t: torch.Tensor, owner: object) -> None:
    """Page-lock t's memory in place and map it for every device (cudaHostRegisterPortable | Mapped); unregistered
    when `owner` (the module reading it) is freed."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 3)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of the {tuple(t.shape)} embedding table failed (CUDA error {code}): "
                           "the host may limit locked memory (ulimit -l)")
    weakref.finalize(owner, cudart.cudaHostUnregister, t.data_ptr())


def move_embeddings_to_host(model: nn.Module) -> int:
    """Move model.model.embed_tokens (an nn.Embedding on a CUDA device) into page-locked host memory, read by the
    GPU from there; returns the bytes of GPU memory freed (0 on the CPU, where the table already is in host
    memory). Tensor-parallel (vocab-parallel) embeddings and pipeline stages are refused: the table then lives in
    shards or on a stage's device."""
    holder = model.model
    emb = holder.embed_tokens
    if getattr(model, "stages", None) is not None or getattr(model, "tp", None) is not None:
        raise ValueError("embeddings_on_host needs the model on one device (not tensor or pipeline parallel)")
    if isinstance(emb, HostEmbedding):
        return 0
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"embeddings_on_host: model.embed_tokens is a {type(emb).__name__}, not an nn.Embedding")
    device = emb.weight.device
    if device.type != "cuda":
        return 0
    if triton is None:
        raise RuntimeError("embeddings_on_host needs Triton (the gather kernel that reads the table over the bus)")
    table = _page_aligned(emb.weight.shape, emb.weight.dtype)  # ordinary host memory, then locked in place
    table.copy_(emb.weight.detach())
    freed = emb.weight.numel() * emb.weight.element_size()
    host = HostEmbedding(table, device)
    _register(host.weight, host)
    holder.embed_tokens = host
    del emb
    torch.cuda.empty_cache()
    return freed
