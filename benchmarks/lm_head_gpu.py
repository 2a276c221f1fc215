"""The lm_head of a decode step (128,256 x 4,096) on the GPU, next to its floor: bf16 through cuBLAS and through our
one-row GEMV (model/gemv.py), against int8 with per-row scales (quant/int8_kernels.py, what LM_HEAD_INT8 makes it)
at every swept config; 1 row (batch-1 decode) and 16 / 32 / 64 rows (batched decode), each replayed from a CUDA
graph, the best int8 config per row count printed as an int8_kernels.CONFIGS literal (and written to
$OUT/lm_head.json with every time and its error against the exact int8 product).

    PYTHONPATH=. python benchmarks/lm_head_gpu.py [--rows 1,16,32,64] [--out lm_head.json]

Floors: the weight's bytes once at this card's copy bandwidth (1.05 GB in bf16, 0.53 GB in int8).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth, cuda_time, provenance
from cogvlm2.model import gemv as gm
from cogvlm2.quant import formats
from cogvlm2.quant import int8_kernels as ik

VOCAB, HIDDEN = 128256, 4096


def graph_time(fn, repeat: int = 10) -> float:
    """Seconds per call of fn, `repeat` calls replayed from one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    t = cuda_time(graph.replay, warmup=2, iters=7) / repeat
    del graph
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,32,64")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "lm_head.json"))
    args = ap.parse_args()
    copy = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    q, s = formats.quantize_int8(w)
    bf16_floor, int8_floor = w.numel() * 2 / copy, (q.numel() + s.numel() * 4) / copy
    res = {"provenance": provenance(), "floor_ms": {"bf16": bf16_floor * 1e3, "int8": int8_floor * 1e3}, "ms": {}}
    best = dict(ik.CONFIGS)
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
        exact = (x.float() @ q.float().t()) * s
        times = {"cublas bf16": graph_time(lambda: F.linear(x, w))}
        if rows == 1:
            times["gemv bf16"] = graph_time(lambda: gm.gemv(x, w))
        bm = 1 if rows == 1 else ik.block_m(rows)
        int8 = {}
        for config in ik.CANDIDATES[bm]:
            err = ((ik.int8_linear(x, q, s, config).float() - exact).norm() / exact.norm()).item()
            int8[config] = graph_time(lambda c=config: ik.int8_linear(x, q, s, c))
            times[f"int8 {config} (err {err:.1e})"] = int8[config]
        best[bm] = min(int8, key=int8.get)
        print(f"{rows} rows: floors bf16 {bf16_floor * 1e3:.3f} ms, int8 {int8_floor * 1e3:.3f} ms", flush=True)
        for name, t in times.items():
            floor = int8_floor if name.startswith("int8") else bf16_floor
            print(f"  {name:<44} {t * 1e3:7.3f} ms  {floor / t:5.0%} of its floor", flush=True)
        res["ms"][rows] = {k: v * 1e3 for k, v in times.items()}
    print("best int8_kernels.CONFIGS:", best, flush=True)
    res["best"] = {str(k): v for k, v in best.items()}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
