"""A CUDA graph of the vision tower over one medium (an image, or a video's frames), CUDA only.

The tower's pass over one 1344^2 image is 63 layers of several kernel launches each (under fp8 each linear is a
row quantizer and a scaled GEMM; the launches were not counted). Measured on the H200's host
(benchmarks/ttft_spread_gpu.py), a one-image fp8 prefill's host cost is about as long as its GPU time: 190-217 ms
when the host kept ahead, 237-394 ms when the same host ran its ops slower (up to ~2x) — the kernels summing the
same 175-186 ms, the GPU waiting between them. Replayed as one graph, the tower's pass costs the host one launch
whatever the host's speed: with the host slowed on purpose, fp8's TTFT went 257 -> 204 ms (the constant below).

The shape is fixed (a tower pass is [frames, 3, S, S]), so one graph serves every pass of that shape: one image
for image models, the official clip length for video models. Other passes (several media in one step) run
eagerly; they carry more GPU work per launch. The graph is captured before the KV cache is sized, so its memory
pool counts as memory in use; the engine captures it again when its LoRA slot tables or wrapped linears change
(the tower may carry adapters). With capture=False the same buffers run eagerly: the copy-in / copy-out logic runs
on the CPU too.
"""

from __future__ import annotations

import os

import torch

from ..model.cogvlm import CogVLM2ForCausalLM
from ..model.lora import lora_signature

# VISION_GRAPH: replay the tower's pass over one medium as a CUDA graph (the host then launches one graph, not the
# tower's kernels one by one). On an H200 (decode_ab.py --quant fp8 --set "engine.vision_graph.VISION_GRAPH=0" --set
# "engine.vision_graph.VISION_GRAPH=1" --ttft 5, twenty-third session): fp8 TTFT 191.7 -> 190.5 ms with the host
# keeping ahead, 257 -> 204 ms with 16 processes spinning on its cores (--busy 16); bf16 276.7 -> 275.7 ms; its pool
# costs ~30 of ~49,000 KV blocks. COGVLM2_VISION_GRAPH=0 turns it off (read at import)
VISION_GRAPH = os.environ.get("COGVLM2_VISION_GRAPH", "1") != "0"


class VisionGraph:
    def __init__(self, model: CogVLM2ForCausalLM, frames: int, capture: bool = True):
        size = model.config.vision.image_size
        self.lora = lora_signature(model)  # captured with these LoRA tables and wrapped linears
        self.pixels = torch.zeros(frames, 3, size, size, dtype=model.dtype, device=model.device)
        self.graph = None
        with torch.inference_mode():
            self.features = model.encode_images(self.pixels)  # eager; before a capture, the warm-up (autotuning)
            if capture:
                torch.cuda.synchronize(model.device)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.features = model.encode_images(self.pixels)
                torch.cuda.synchronize(model.device)
        self._eager = None if capture else (lambda: model.encode_images(self.pixels))

    def fits(self, pixels: torch.Tensor) -> bool:
        return pixels.shape == self.pixels.shape and pixels.device == self.pixels.device

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [frames, 3, S, S] (any float dtype, cast like encode_images) -> features [frames, tokens, D], a
        new tensor (the graph's own output is overwritten by the next replay)."""
        self.pixels.copy_(pixels)
        if self.graph is None:
            return self._eager()
        self.graph.replay()
        return self.features.clone()


def graph_frames(model: CogVLM2ForCausalLM) -> int:
    """Frames in the tower pass worth a graph: one image, or a video model's full clip."""
    return model.config.max_media_items if model.config.is_video else 1
