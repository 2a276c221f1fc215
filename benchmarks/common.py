"""Shared benchmark helpers: the full-size configs, random bf16 models built on the GPU, timing, floors."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from cogvlm2.config import ModelConfig
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM
from cogvlm2.model.random_init import init_random_

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
# Ceilings measured on the lent H100 (see BENCHMARKS.md): bytes read + written per second, bf16 matmul.
COPY_BANDWIDTH = 2.985e12
MATMUL_FLOPS = 790e12


def full_size_config(name: str = "cogvlm2-llama3-chat-19B") -> ModelConfig:
    return ModelConfig.from_file(CONFIGS / f"{name}.json")


def random_model(config: ModelConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> CogVLM2ForCausalLM:
    """Full-size model with random weights created directly on the GPU (no host copy)."""
    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    return init_random_(model, seed=0, device=device, dtype=dtype).eval().requires_grad_(False)


def cuda_time(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": commit or os.environ.get("COMMIT", "")}


def report(rows: list[dict], out: str | None = None) -> None:
    """Print one line per figure: value, floor, fraction of the floor achieved; optionally save JSON."""
    for r in rows:
        frac = f"{r['floor'] / r['value']:.0%}" if r.get("lower_is_better") else f"{r['value'] / r['floor']:.0%}"
        print(f"{r['name']:<48} {r['value']:>10.2f} {r['unit']:<8} floor {r['floor']:>9.2f}  achieved {frac}"
              f"  ({r['floor_how']})")
    if out:
        Path(out).write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=2))
