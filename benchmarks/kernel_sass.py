"""What the decode GEMVs' main loops compile to on an H100 / H200 (sm_90), read without a GPU: each kernel is
compiled by Triton's own ptxas for sm_90 and disassembled by its cuobjdump; for the loop (the code between a
backward branch and its target) this prints the SASS instruction count per weight element ("a code"), the
barriers, shared-memory and global loads, and the most frequent opcodes.

    PYTHONPATH=. python benchmarks/kernel_sass.py

Why: a memory-bound GEMV reaches copy bandwidth only if its loads stay in flight and it issues few enough
instructions per byte. The 4-bit GEMVs stalled at ~1.2 TB/s on the H200 while the bf16 GEMV streamed at 96-99% of
copy; this report showed the difference (29 barriers a step in the float int4 GEMV's loop: a sum across threads
every step, against one at the end), see BENCHMARKS.md. Integer arguments named N are declared divisible by 16, as
Triton specializes them at run time (without that the loads are not vectorized and the counts mislead). The
counts depend on Triton's version: read them with the GPU machine's (3.6 in 2026-11; `PYTHONPATH=<triton 3.6>:.`).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvlm2.model import gemv as gm  # noqa: E402
from cogvlm2.quant import triton_kernels as tk  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, **options):
    """fn compiled for sm_90; pointers, N and stride-like (s*) integers declared 16-divisible."""
    names = list(signature)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if signature[n].startswith("*") or (signature[n] == "i32" and (n == "N" or n.startswith("s")))}
    sig = dict(signature) | {k: "constexpr" for k in constexprs}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass(kernel) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's SASS."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kernel_sass_{os.getpid()}.cubin"
    path.write_bytes(kernel.asm["cubin"])
    try:
        out = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                             check=True).stdout
    finally:
        path.unlink(missing_ok=True)
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(LINE.match, out.splitlines()) if m]


def loop_report(kernel, codes_per_thread_step: float) -> str:
    """The longest loop's statistics: instructions per code, barriers, loads, top opcodes."""
    lines = sass(kernel)
    loops = []
    for i, (addr, ins) in enumerate(lines):
        m = re.search(r"\bBRA (?:\S+ )?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            start = next(j for j, (a, _) in enumerate(lines) if a >= int(m.group(1), 16))
            loops.append(lines[start:i + 1])
    if not loops:
        return "no loop (fully unrolled)"
    body = max(loops, key=len)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for _, ins in body)
    return (f"loop {len(body)} instructions = {len(body) / codes_per_thread_step:.1f} a code; BAR {ops['BAR']}, "
            f"LDS {ops['LDS']}, LDG {ops['LDG']}, LDGSTS {ops['LDGSTS']}, SHFL {ops['SHFL']}; top: "
            + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))


def main() -> None:
    int4 = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32"}
    a8 = {"xe_ptr": "*i32", "xo_ptr": "*i32", "sx_ptr": "*fp32", "sq_ptr": "*i32", "qw_ptr": "*i32",
          "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "final_ptr": "*bf16", "count_ptr": "*i32", "N": "i32",
          "qw2_ptr": "*i32", "qz2_ptr": "*i32", "s2_ptr": "*bf16", "out2_ptr": "*fp32", "final2_ptr": "*bf16"}
    a8 = {"x_ptr": "*bf16"} | a8
    fp4 = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*fp32", "lut_ptr": "*fp32", "nabs_ptr": "*fp32",
           "nmap_ptr": "*fp32", "offset": "fp32", "out_ptr": "*fp32", "N": "i32"}
    bf16 = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "stride_wn": "i32"}
    rows = []
    bn, bk, warps, stages, _ = tk.CONFIGS[("int4", "gemv")]
    rows.append((f"int4 gemv {tk.CONFIGS[('int4', 'gemv')]}", compile_sm90(
        tk._int4_gemv_kernel, int4, dict(K=4096, BLOCK_N=bn, BLOCK_K=bk, GROUP=128, SPLIT_K=2, STAGES=stages),
        num_warps=warps, num_stages=stages), bn * bk / (32 * warps)))
    for config in tk.CANDIDATES[("int4", "gemv2")]:
        bn, _, warps, stages, _ = config
        rows.append((f"int4 gemv2 {config}", compile_sm90(
            tk._int4_gemv2_kernel, int4, dict(K=4096, BLOCK_N=bn, GROUP=128, SPLIT_K=2, STAGES=stages, ASM=True),
            num_warps=warps, num_stages=stages), bn * 128 / (32 * warps)))
    bn, _, warps, stages, _ = tk.CONFIGS[("int4", "gemv-a8")]
    rows.append((f"int4 gemv-a8 {tk.CONFIGS[('int4', 'gemv-a8')]}", compile_sm90(
        tk._int4_gemv_a8_kernel, a8, dict(K=4096, BLOCK_N=bn, GROUP=128, SPLIT_K=4, ASM=True, STAGES=stages,
                                           FUSED_QUANT=False, NG_PAD=8, FUSED_SUM=False, L2_ROWS=0, PDL=False,
                                           PAIR=False),
        num_warps=warps, num_stages=stages), bn * 128 / (32 * warps)))
    bn, bk, warps, stages, _ = tk.CONFIGS[("fp4", "gemv")]
    for once in (False, True):
        rows.append((f"fp4 gemv {tk.CONFIGS[('fp4', 'gemv')]}{' sum once' if once else ''}", compile_sm90(
            tk._fp4_gemv_kernel, fp4, dict(K=4096, BLOCK_N=bn, BLOCK_K=bk, BLOCKSIZE=64, ARITH=True, NESTED=False,
                                           SPLIT_K=1, STAGES=stages, SUM_ONCE=once), num_warps=warps,
            num_stages=stages), bn * bk / (32 * warps)))
    fa8 = {"xw_ptr": "*i32", "sx_ptr": "*fp32", "w_ptr": "*i32", "absmax_ptr": "*fp32", "out_ptr": "*fp32",
           "final_ptr": "*bf16", "count_ptr": "*i32", "N": "i32", "w2_ptr": "*i32", "absmax2_ptr": "*fp32",
           "out2_ptr": "*fp32", "final2_ptr": "*bf16"}
    for bn, bk, warps, stages, split in tk.CANDIDATES[("fp4", "gemv-a8")]:
        rows.append((f"fp4 gemv-a8 {(bn, bk, warps, stages, split)}", compile_sm90(
            tk._fp4_gemv_a8_kernel, fa8, dict(K=4096, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, STAGES=stages, ASM=True,
                                              L2_LINES=0, FUSED_SUM=False, PDL=False, PAIR=False),
            num_warps=warps, num_stages=stages), bn * bk / (32 * warps)))
    bn, bk, warps, stages = gm.CONFIG
    rows.append((f"bf16 gemv {gm.CONFIG}", compile_sm90(
        gm._gemv_kernel, bf16, dict(K=4096, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, PDL=True), num_warps=warps,
        num_stages=stages), bn * bk / (32 * warps)))
    for name, kernel, per_thread in rows:
        print(f"{name:<36} {loop_report(kernel, per_thread)}", flush=True)


if __name__ == "__main__":
    main()
