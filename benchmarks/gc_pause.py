"""How long a full garbage collection stalls the host once an engine is built, with and without engine.core.GC_FREEZE.

A full collection walks every container object Python tracks (torch's and Triton's own, the model's, the
processor's): a host pause, which in the middle of a step outlasts the GPU work queued ahead of it (a decode step
is ~4 ms; with async scheduling the host is one step ahead). The frozen heap (gc.freeze) is skipped. On the GPU
machine the full-size model with random weights; `--tiny` the embedded tiny model on the CPU (a KV pool of as
many blocks as the H200 run holds; the blocks are arrays, not Python objects):

    PYTHONPATH=. python benchmarks/gc_pause.py [--tiny] [--out gc.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from unittest import mock

import numpy as np
import torch

from cogvlm2.devices import thaw_heap
from cogvlm2.engine import core
from cogvlm2.engine.config import EngineConfig

H200_KV_BLOCKS = 42483  # engine_gpu.py's pool on one H200 (0.9 utilization, bf16)


def full_collection_ms(rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny model on the CPU")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tiny:
        from cogvlm2.llm import load_processor_and_model

        model, _ = load_processor_and_model("tiny", device="cpu", dtype="float32")
        config = EngineConfig(num_kv_blocks=H200_KV_BLOCKS, max_model_len=4096)
    else:
        from benchmarks.common import full_size_config, random_model

        model = random_model(full_size_config())
        config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
    rows = {}
    for freeze in (False, True):
        with mock.patch.object(core, "GC_FREEZE", freeze):
            engine = core.EngineCore(model, config)
            rows[f"GC_FREEZE={int(freeze)}"] = {"tracked_objects": len(gc.get_objects()),
                                                "frozen_objects": gc.get_freeze_count(),
                                                "full_collection_ms": full_collection_ms()}
            del engine
            thaw_heap()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    device = "cpu (tiny model)" if args.tiny else torch.cuda.get_device_name()
    for name, row in rows.items():
        print(f"{device}: {name}: {row['tracked_objects']:,} tracked objects ({row['frozen_objects']:,} frozen), "
              f"a full collection {row['full_collection_ms']:.1f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
