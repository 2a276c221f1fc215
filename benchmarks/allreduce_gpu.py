"""All-reduce latency on this machine's GPUs: NCCL against the one-shot peer-to-peer kernel
(`cogvlm2/model/peer_all_reduce.py`), for the message sizes of tensor-parallel decode and prefill.

    torchrun --nproc-per-node 2 benchmarks/allreduce_gpu.py [--out allreduce.json]

Each size is rows x 4096 bf16 (the language model's hidden size: batch rows at decode, prompt tokens at
prefill). 64 all-reduces in a row (one decode step of the 19B model holds 65) are captured in one CUDA graph
and replayed; the figure is the time per all-reduce, median over replays. Before timing, every size checks
that the peer kernel's sum equals NCCL's bit for bit on random data, on every rank. The floor is one read of
the peer's message over NVLink (the message size at the measured peer copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvlm2.model.peer_all_reduce import PeerAllReduce  # noqa: E402

HIDDEN, CHAIN, REPLAYS = 4096, 64, 20
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2331]


def graph_time(fn, x: torch.Tensor) -> float:
    """Seconds per call of fn(x), CHAIN calls captured in one graph, median of REPLAYS replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CHAIN):
            fn(x)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CHAIN)
    return sorted(times)[len(times) // 2]


def peer_bandwidth(rank: int) -> float:
    """Bytes/s of a copy from the other GPU into this one (NVLink), 256 MB."""
    if rank != 0:
        return 0.0
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda:1")
    dst = torch.empty_like(src, device="cuda:0")
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 10 * src.numel() / (start.elapsed_time(end) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    args = ap.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    world = dist.get_world_size()
    largest = max(ROWS) * HIDDEN * 2
    peer = PeerAllReduce(None, torch.device("cuda", rank), torch.bfloat16, max_bytes=largest)
    bw = peer_bandwidth(rank) if world == 2 and torch.cuda.device_count() >= 2 else 0.0
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    for n in ROWS:
        x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref, got = x.clone(), x.clone()
        dist.all_reduce(ref)
        peer(got)
        same = torch.tensor([int(torch.equal(ref, got))], device="cuda")
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        nccl_s = graph_time(lambda t: dist.all_reduce(t), x.clone())
        peer_s = graph_time(peer, x.clone())
        nbytes = n * HIDDEN * 2
        row = {"rows": n, "bytes": nbytes, "nccl_us": nccl_s * 1e6, "peer_us": peer_s * 1e6,
               "peer_equals_nccl": bool(same.item()),
               "floor_us": nbytes * (world - 1) / bw * 1e6 if bw else None}
        rows.append(row)
        if rank == 0:
            floor = f"{row['floor_us']:.1f}" if row["floor_us"] else "-"
            print(f"{n:5d} rows {nbytes / 1024:8.0f} KiB  NCCL {row['nccl_us']:7.1f} us  peer {row['peer_us']:7.1f} us "
                  f"({row['nccl_us'] / row['peer_us']:.2f}x)  floor {floor} us  bit-equal {row['peer_equals_nccl']}",
                  flush=True)
    if rank == 0:
        print(f"peer copy bandwidth {bw / 1e9:.0f} GB/s; {torch.cuda.get_device_name()} x {world}")
        if args.out:
            Path(args.out).write_text(json.dumps({"peer_copy_GBps": bw / 1e9, "rows": rows}, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
