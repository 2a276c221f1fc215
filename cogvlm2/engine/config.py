"""EngineConfig: the serving engine's knobs (KV pool, batching budget, prefix cache, CUDA graphs), validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ModelConfig

CPU_KV_CACHE_BYTES = 2 << 30  # on CPU the pool is capped at this many bytes (no memory profiling there)
CPU_KV_CACHE_SEQS = 4  # ... and otherwise holds this many sequences of max_model_len tokens
# Pixels one pass of the vision tower takes (four 1344^2 images; 144 video frames at 224^2): a step that must encode
# more (a burst of prompts whose cached KV ends inside their images) runs the tower several times, so its
# activations stay those of one such pass (~4 GB for the 19B), which is what the KV pool's sizing profiles.
VISION_PIXELS = 4 * 1344 * 1344


def default_graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 80, ... up to max_num_seqs (which is always included)."""
    sizes = [1, 2, 4, 8, 16, 24, 32] + list(range(48, max_num_seqs + 1, 16))
    return tuple(sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs}))


@dataclass
class EngineConfig:
    """block_size             tokens per KV block
    max_num_seqs              sequences in one step (decode batch size)
    max_num_batched_tokens    tokens computed per step; longer prompts are prefilled in chunks
    max_model_len             prompt + generated tokens of one sequence, the KV budget (None: the
                              model's max_position_embeddings plus the tokens that share positions in
                              its largest media, `ModelConfig.default_max_model_len`; resolved by
                              `for_model`); rotary positions are checked separately
    num_kv_blocks             explicit KV pool size (tests use tiny pools); None: sized from
                              gpu_memory_utilization on CUDA, from CPU_KV_CACHE_* on CPU
    enable_prefix_caching     share full KV blocks between requests with equal prefixes (image included)
    enforce_eager             no CUDA graphs (debugging); CPU is always eager
    cuda_graph_batch_sizes    decode batch sizes captured as CUDA graphs (None: default buckets)
    adapter_id                part of every prefix hash: a LoRA adapter changes the KV of equal tokens
    async_scheduling          launch the next step (decoding rows, the next chunks of prefills in progress,
                              waiting requests admitted) before collecting the previous one, overlapping host
                              work (outputs, stops, scheduling) with the device (see core.py); False: every
                              step waits for its ids
    embeddings_on_host        keep the token embedding table in page-locked host memory, read by the GPU over the
                              bus (model/host_embedding.py): 1.05 GB less GPU memory for CogVLM2's; one device only
    """

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    adapter_id: str | None = None
    async_scheduling: bool = True
    embeddings_on_host: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size must be a power of 2"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.cuda_graph_batch_sizes is None:
            self.cuda_graph_batch_sizes = default_graph_batch_sizes(self.max_num_seqs)
        self.cuda_graph_batch_sizes = tuple(sorted(set(self.cuda_graph_batch_sizes)))
        if any(s < 1 or s > self.max_num_seqs for s in self.cuda_graph_batch_sizes):
            raise ValueError("cuda_graph_batch_sizes must lie in [1, max_num_seqs]")

    def for_model(self, model_config: ModelConfig) -> "EngineConfig":
        """A copy with the model-dependent defaults filled in."""
        max_len = self.max_model_len or model_config.default_max_model_len
        return dataclasses.replace(self, max_model_len=max_len)

    @property
    def max_blocks_per_seq(self) -> int:
        assert self.max_model_len is not None, "call for_model() first"
        return -(-self.max_model_len // self.block_size)
