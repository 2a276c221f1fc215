"""Compile a Triton kernel for an H100 / H200 (sm_90) on a machine without a GPU: Triton's wheels bundle ptxas.
The tests use it to check code that only the GPU path runs (fp8 MMAs, inline PTX) and how it compiles (pipelined
loads, no register spills, shared memory), which Triton's interpreter cannot."""

from __future__ import annotations

import pytest


def compile_for_hopper(fn, signature: dict[str, str], constexprs: dict, gluon: bool = False,
                       divisible: tuple[str, ...] = (), **options):
    """The compiled kernel (its .asm["ptx"], .metadata.shared) of `fn` for sm_90. Pointers, the arguments named
    like strides (s*) and those in `divisible` are declared 16-divisible, as Triton's launcher specializes them at
    run time (without that the loads are scalar and nothing is pipelined; an unaligned length masks every element).
    Skips where this Triton has no ptxas. gluon: fn is a Gluon kernel (cogvlm2/quant/gluon_kernels.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if signature[n].startswith("*") or (n.startswith("s") and signature[n] == "i32") or n in divisible}
    sig = dict(signature) | {k: "constexpr" for k in constexprs}
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: F811
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"this Triton install has no ptxas: {e}")
        raise
