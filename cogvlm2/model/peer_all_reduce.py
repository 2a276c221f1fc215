"""A one-shot all-reduce over symmetric memory for the small messages of tensor-parallel decode.

A decode step of the 19B model at TP=2 holds 65 all-reduces of B x 4096 activations (8 KB at batch 1).
NCCL takes 12.8 us for such a message on 2 H200s (`benchmarks/allreduce_gpu.py`); the one-shot kernel here
takes 6.6 us, bit-equal, which made TP=2 decode 3% faster (225 -> 232 tok/s; the rest of the distance from the
4.3 ms step to its ~1.8 ms weight-read floor is not communication: 65 x 6.6 us is 0.43 ms). Here every
rank owns one buffer of a symmetric-memory allocation that the others map (peer-to-peer over NVLink), and
one kernel per all-reduce (PyTorch's `symm_mem.one_shot_all_reduce_copy_out`)
copies the local partial sum into the rank's buffer, meets the other ranks at a barrier, reads every
rank's buffer, sums in a fixed rank order (so all ranks hold bit-identical results) and meets them again
(so the buffer can be reused by the next all-reduce). No NVLink multicast is used (the kernel reads peers
with plain loads), so it runs where multicast is unavailable or forbidden.

Messages over `max_bytes`, of another dtype, or not 16-byte aligned go to NCCL (prefill and the vision
tower's all-reduces are large and bandwidth-bound: NCCL's ring is the right tool there). The kernel is an
ordinary launch on the current stream, so CUDA graphs capture it like NCCL's.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# decode's B x 4096 bf16 activations up to batch 64 (the sizes TP decode was measured with). Measured on 2 H200s:
# one-shot beats NCCL up to 4 MiB (1.9x at 8 KiB, 1.5x at 512 KiB, 1.1x at 4 MiB) and loses at 18 MiB
DEFAULT_MAX_BYTES = 512 * 1024

# symmetric-memory rendezvous this process has made. torch numbers the store keys of a rendezvous by a counter of
# its own per process, so ranks whose processes made different numbers of them wait on different keys forever:
# a driver that served an earlier tensor-parallel engine (rank 0 lives in it) with freshly spawned ranks.
# `try_build` compares the counts first and falls back to NCCL when they differ (measured on 2 H200s: the
# second TP engine of one process hung in `rendezvous`)
_rendezvous_made = 0


class PeerAllReduce:
    """The symmetric buffer of one tensor-parallel group and the dtype it reduces; call it on a tensor to
    sum it over the ranks in place. Collective to build (every rank must construct it together)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        # one-shot reads peers with plain loads; never ask for a multicast object (machines may forbid it)
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy_out  # AttributeError in a torch without it
        group = group if group is not None else dist.group.WORLD
        self.group_name = group.group_name
        self.dtype, self.max_bytes = dtype, max_bytes
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        global _rendezvous_made
        _rendezvous_made += 1  # before the call: one that fails part-way then makes the counts differ (a fallback)
        handle = symm_mem.rendezvous(self.buffer, self.group_name)
        # the barrier's flags: a rank's arrivals land in the others' pads (`unblock`)
        self._own_pad = handle.get_signal_pad(handle.rank, dtype=torch.int32)
        self._peer_pads = [handle.get_signal_pad(r, dtype=torch.int32) for r in range(handle.world_size)
                           if r != handle.rank]

    @classmethod
    def try_build(cls, group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> "PeerAllReduce | None":
        """The all-reduce, or None (with a warning; NCCL then does every all-reduce) where symmetric memory
        or peer access is unavailable. Every rank agrees: a rank that failed makes all of them fall back."""
        reducer, error = None, ""
        if not _same_everywhere(_rendezvous_made, group, device):  # the same answer on every rank: none builds
            error = ("the ranks' processes made different numbers of symmetric-memory rendezvous (an earlier "
                     "tensor-parallel engine in this process), whose keys would never meet")
        else:
            try:
                reducer = cls(group, device, dtype, max_bytes)
            except Exception as e:  # noqa: BLE001 - no symm_mem in this torch, no P2P between the GPUs, ...
                error = f"{type(e).__name__}: {e}"
        if _everyone(reducer is not None, group, device):  # then a first sum, checked on every rank
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            probe, right = torch.full((64,), float(rank + 1), device=device, dtype=dtype), False
            try:
                right = bool((reducer(probe) == size * (size + 1) / 2).all())
                error = "" if right else "its first sum was wrong"
            except Exception as e:  # noqa: BLE001 - e.g. a kernel this GPU cannot run
                error = f"{type(e).__name__}: {e}"
            if _everyone(right, group, device):
                return reducer
        logger.warning("tensor parallelism: the peer-to-peer all-reduce is unavailable (%s); NCCL does every "
                       "all-reduce", error or "another rank could not build it")
        return None

    def takes(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.dtype == self.dtype and 0 < nbytes <= self.max_bytes and x.is_contiguous()
                and nbytes % 16 == 0 and x.data_ptr() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (x must pass `takes`)."""
        flat = x.view(-1)
        self._op(self.buffer[: flat.numel()], flat, "sum", self.group_name, flat)
        return x

    def unblock(self, seconds: float = 10.0) -> None:
        """After a peer died: its barrier signals never come, so a kernel of ours waiting for them spins
        forever (the barrier has no timeout, and aborting NCCL does not reach it); so does one waiting to
        post its own arrival into a dead peer's pad (a flag the peer never consumes). For `seconds`, a
        thread keeps marking every peer as arrived in this rank's pad and the flags of the peers' pads as
        consumed (on a stream of its own, which runs beside the spinning kernel), so the step's remaining
        all-reduces run through (their sums are garbage: the step has already failed) and the GPU drains
        before its memory is freed."""
        own, peers, device = self._own_pad, self._peer_pads, self.buffer.device

        def mark() -> None:
            stream = torch.cuda.Stream(device)
            deadline = time.monotonic() + seconds
            with torch.cuda.stream(stream):
                while time.monotonic() < deadline:
                    own.fill_(1)
                    for pad in peers:
                        pad.fill_(0)
                    stream.synchronize()
                    time.sleep(0.001)

        threading.Thread(target=mark, name="cogvlm2-peer-unblock", daemon=True).start()


def _same_everywhere(value: int, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether every rank passes the same value (its MIN and MAX over the ranks agree)."""
    lo = torch.tensor([value], device=device, dtype=torch.int64)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(lo.item() == hi.item())


def _everyone(ok: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ok holds on every rank (NCCL: a MIN all-reduce)."""
    flag = torch.tensor([int(ok)], device=device, dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
