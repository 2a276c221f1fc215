"""Programmatic dependent launch (PDL, sm_90+) for the decode path's Triton kernels.

A decode step at batch 1 is ~330 small kernels in a row (per layer: add + RMSNorm, the QKV GEMV, rotary, the K/V
store, two attention passes, the output GEMV, add + RMSNorm, gate / up, down). Each waits for the one before it to
finish, drain its last wave and flush, and only then is launched and starts loading: a few microseconds a boundary
in which the GPU streams nothing. With PDL a kernel is launched while its predecessor still runs: every program
of the predecessor signals at its start (`launch_dependents`) that the next kernel may be scheduled, and the next
kernel's programs block in `wait` until the predecessor has finished and its writes are visible. What a program
does before `wait` overlaps the predecessor's tail: launch and setup, and in the GEMVs the first tile of weights
(weights never depend on the previous kernel).

Rules every kernel launched with PDL follows (else it races): it calls `wait` on every path, before it reads
anything a previous kernel wrote and before it writes anything at all; before `wait` it reads only weights.
A kernel after a PDL kernel that is not launched with PDL (cuBLAS, torch ops, NCCL) waits for it as usual.
Not the 4-bit kernels (quant/triton_kernels.py): with PDL the int4 W4A8 chain (quantize x, GEMV, split-K sum) ran
slower on the H200 (the LM's int4 linears at batch 1 in one graph 2.00 -> 2.43 ms; engine int4 decode 320 -> 256
tok/s, BENCHMARKS.md), for a reason not found; the bf16 path gained (engine batch 1 226 -> 233, TP=2 279 -> 296).
The W4A8 GEMV with its sum folded in, launched with PDL (quant/triton_kernels.py: A8_FUSED["pdl"]), was slower
still (engine int4 decode 333 -> 239 tok/s, 2026-12-01), so it stays off. CUDA graphs keep the dependencies
(captured as programmatic edges). Off with COGVLM2_PDL=0 (read at import), and
always off the GPU (Triton's interpreter runs the kernels on the CPU in the tests) and before sm_90.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3 (griddepcontrol); older ones run the kernels without PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

ENABLED = os.environ.get("COGVLM2_PDL", "1") != "0" and gdc_wait is not None


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def options(x: torch.Tensor) -> dict:
    """The PDL constexpr and launch option of a kernel whose tensors are on x's device: pass as `**options(x)`."""
    if ENABLED and x.is_cuda and _supported(x.get_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel be scheduled once every program of this one has started (call first)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel has finished and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """Bring the 128-byte lines at `ptrs` (any shape) into L2 (`prefetch.global.L2`, GPU only): what a kernel
    launched early may do with weights before its `wait`."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def enter(PDL: tl.constexpr):
    """Both, for a kernel with nothing to do before it depends on its predecessor."""
    launch_dependents(PDL)
    wait(PDL)
