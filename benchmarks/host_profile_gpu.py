"""Host-side profile (cProfile) of steady decode steps at batch 32 on the full-size model: which Python
work the GPU waits for. Complements profile_gpu.py (device kernels).

    PYTHONPATH=. python benchmarks/host_profile_gpu.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

from benchmarks.common import full_size_config, random_model
from benchmarks.engine_gpu import QUESTION, image
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.sampling_params import SamplingParams


def main() -> None:
    cfg = full_size_config()
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    engine = LLMEngine(random_model(cfg), EngineConfig(max_num_seqs=32, gpu_memory_utilization=0.9), proc)
    for i in range(32):
        engine.add_request(f"r{i}", proc(QUESTION, image=image(i)),
                           SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True))
    while not all(s.num_output_tokens > 5 for s in engine.seqs.values()):
        engine.step()
    prof = cProfile.Profile()
    t0, n = time.perf_counter(), 0
    prof.enable()
    for _ in range(40):
        engine.step()
        n += 1
    prof.disable()
    print(f"{(time.perf_counter() - t0) / n * 1e3:.2f} ms per step under cProfile")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
