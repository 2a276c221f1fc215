"""Zeroed int32 counters for kernels whose last program finishes the work of its peers (the W4A8 GEMV's split-K
sum, the decode attention's merge of its context chunks): each program adds 1 (acq_rel at GPU scope) after writing
its partial result, the one that counts last combines them and puts its counter back to 0 for the next launch.

One buffer per (user, device): the kernels of one user run one after another on the device's stream, so they can
share it. Allocated on first use and never outside it: allocating during CUDA graph capture would bake a fresh
buffer into the graph, so a first use under capture is an error (the engine runs every shape before capturing)."""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}
MIN_SIZE = 4096


def counters(user: str, device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 counters of `user` on `device` (the same buffer at every call that fits it)."""
    key = (user, torch.device(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if key[1].type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{user}: its counters must be allocated before CUDA graph capture (run the shape once)")
        buf = _BUFFERS[key] = torch.zeros(max(n, MIN_SIZE), dtype=torch.int32, device=device)
    return buf
