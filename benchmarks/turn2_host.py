"""Host cost of a second turn on the CPU: `tiny-random` (whose compute is negligible), a 2.3K-token first turn
with an image, then the same conversation one turn later (prefix-cache hit, ~11 new tokens): wall time from
add_request to the first token, median of 7. What the GPU's second-turn TTFT pays on the host, without a GPU.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/turn2_host.py
"""

from __future__ import annotations

import statistics
import time

import torch
from PIL import Image

from cogvlm2.llm import LLMEngine
from cogvlm2.sampling_params import SamplingParams


def first_token_ms(engine: LLMEngine, rid: str, inputs) -> float:
    t0 = time.perf_counter()
    engine.add_request(rid, inputs, SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True))
    while not any(out.request_id == rid for out in engine.step()):
        pass
    t = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return t * 1e3


def main() -> None:
    torch.set_num_threads(1)
    engine = LLMEngine.from_pretrained("tiny-random", dtype="float32", device="cpu", max_num_seqs=4,
                                       max_model_len=8192, num_kv_blocks=2048)
    proc, picture = engine.processor, Image.new("RGB", (64, 64), (200, 10, 10))
    question = " ".join(["word"] * 2300)
    first = proc(question, image=picture)
    second = proc("What colour?", history=[(question, "A red square.")], image=picture)
    first_token_ms(engine, "first", first)
    times = [first_token_ms(engine, f"second-{i}", second) for i in range(7)]
    print(f"prompt {len(first.input_ids)} -> {len(second.input_ids)} tokens; second-turn first token: "
          f"median {statistics.median(times):.1f} ms ({', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
