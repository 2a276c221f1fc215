"""Zeroed int32 counters for kernels whose last program finishes the work of its peers (the W4A8 GEMV's split-K
sum): each program adds 1 (acq_rel at GPU scope) after writing its partial result, the one that counts last
combines them and puts its counter back to 0 for the next launch.

One buffer per (user, device): the kernels of one user run one after another on the device's stream, so they can
share it. Allocated on first use and never outside it: allocating during CUDA graph capture would bake a fresh
buffer into the graph, so a first use under capture is an error (the engine runs every shape before capturing)."""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU installs never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

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


if triton is not None:
    @triton.jit
    def last_to_arrive(count_ptr, index, arrivals: tl.constexpr):
        """Whether this program is the last of `arrivals` to count at count_ptr[index]: called after the program has
        written its partial result (a barrier first, so every thread's writes precede the count; the add acq_rel at
        GPU scope, so the last one sees its peers' writes, which it reads past L1 with cache_modifier=".cg"). The
        last one puts the counter back to 0 after combining them: `tl.store(count_ptr + index, 0)`."""
        tl.debug_barrier()
        return tl.atomic_add(count_ptr + index, 1, sem="acq_rel", scope="gpu") == arrivals - 1
