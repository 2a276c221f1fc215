"""Shared benchmark helpers: the full-size configs, random bf16 models built on the GPU, timing, floors."""

from __future__ import annotations

import functools
from dataclasses import dataclass
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


@functools.lru_cache(maxsize=None)
def ceilings() -> tuple[float, float]:
    """This card's ceilings, measured in the same process as the figures they bound (an H100's and an H200's
    differ): device-to-device copy of 1 GiB in bytes read + written per second, and the bf16 8192^3 matmul
    rate in FLOP/s (medians of 10 runs)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() / cuda_time(lambda: y.copy_(x), warmup=3, iters=10)
    del x, y
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    flops = 2 * 8192**3 / cuda_time(lambda: a @ b, warmup=3, iters=10)
    del a, b
    torch.cuda.empty_cache()
    print(f"ceilings of this card: copy {copy / 1e9:,.0f} GB/s, bf16 matmul {flops / 1e12:,.0f} TFLOP/s")
    return copy, flops


def copy_bandwidth() -> float:
    return ceilings()[0]


def matmul_flops() -> float:
    return ceilings()[1]


def provenance() -> dict:
    """Card, torch, date, commit ($COMMIT first: a copied tree's .git may name another commit) and ceilings."""
    commit = os.environ.get("COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    out = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": commit}
    if torch.cuda.is_available():
        out["copy_bandwidth_GBps"], out["matmul_bf16_TFLOPs"] = (round(v / s) for v, s in zip(ceilings(), (1e9, 1e12)))
    return out


def report(rows: list[dict], out: str | None = None) -> None:
    """Print one line per figure: value, floor, fraction of the floor achieved; optionally save JSON."""
    for r in rows:
        frac = f"{r['floor'] / r['value']:.0%}" if r.get("lower_is_better") else f"{r['value'] / r['floor']:.0%}"
        print(f"{r['name']:<48} {r['value']:>10.2f} {r['unit']:<8} floor {r['floor']:>9.2f}  achieved {frac}"
              f"  ({r['floor_how']})")
    if out:
        Path(out).write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=2))


@dataclass(frozen=True)
class RandomModel:
    """A `ModelSpec` factory (picklable: every tensor-parallel rank calls it): the full-size random model
    (seed 0, so the same weights in every process), or the tiny architecture's with tiny=True, and under
    tensor parallelism this rank's shard of it (`shard_model`: the slices a checkpoint load would read)."""

    config_name: str = "cogvlm2-llama3-chat-19B"
    tiny: bool = False

    def config(self) -> ModelConfig:
        from cogvlm2.tiny import tiny_config

        return tiny_config() if self.tiny else full_size_config(self.config_name)

    def __call__(self, dtype, device, tensor_parallel=None) -> CogVLM2ForCausalLM:
        from cogvlm2.checkpoint import parse_dtype
        from cogvlm2.model import shard_model

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        model = random_model(self.config(), device=device, dtype=parse_dtype(dtype))
        return model if tensor_parallel is None else shard_model(model, tensor_parallel)
