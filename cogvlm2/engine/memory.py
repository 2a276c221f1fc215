"""How many KV blocks fit: on CUDA, free memory after the weights and a profiling step; on CPU, a fixed cap."""

from __future__ import annotations

import torch

from ..model.batch import ForwardBatch
from ..model.cogvlm import CogVLM2ForCausalLM
from .attention import Attend, AttentionMetadata, KVCache, PagedAttention
from .config import CPU_KV_CACHE_BYTES, CPU_KV_CACHE_SEQS, EngineConfig


def num_kv_blocks(model: CogVLM2ForCausalLM, config: EngineConfig, attend: Attend) -> int:
    """config.num_kv_blocks when given, else sized as above; raises unless one sequence of max_model_len fits
    (the scheduler relies on it: the oldest running sequence can always make progress)."""
    cfg = model.config
    per_block = KVCache.bytes_per_block(cfg.num_hidden_layers, config.block_size, cfg.num_key_value_heads,
                                        cfg.head_dim, model.dtype)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif model.device.type != "cuda":
        blocks = min(CPU_KV_CACHE_BYTES // per_block, CPU_KV_CACHE_SEQS * config.max_blocks_per_seq)
    else:
        blocks = int(_free_cuda_bytes_after_profile(model, config, attend) // per_block)
    if blocks < config.max_blocks_per_seq:
        fix = "raise num_kv_blocks" if config.num_kv_blocks is not None else "raise gpu_memory_utilization"
        raise ValueError(f"the KV cache holds {blocks} blocks of {config.block_size} tokens, fewer than one sequence "
                         f"of max_model_len={config.max_model_len} needs ({config.max_blocks_per_seq}); lower "
                         f"max_model_len or {fix}")
    return blocks


@torch.inference_mode()
def _free_cuda_bytes_after_profile(model: CogVLM2ForCausalLM, config: EngineConfig, attend: Attend) -> float:
    """Run the largest step (max_num_batched_tokens prompt tokens, one image, max_num_seqs logits +
    sort) on a throwaway cache, then budget = total * utilization - everything else at its peak."""
    cfg, device = model.config, model.device
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    n = min(config.max_num_batched_tokens, config.max_model_len)
    scratch = KVCache(cfg.num_hidden_layers, -(-n // config.block_size), config.block_size,
                      cfg.num_key_value_heads, cfg.head_dim, model.dtype, device)
    blocks = torch.arange(scratch.num_blocks, device=device)
    meta = AttentionMetadata(torch.arange(n, device=device), blocks[None], torch.tensor([n], device=device),
                             torch.tensor([0, n], device=device), [n], [n])
    size = cfg.vision.image_size
    model.encode_images(torch.zeros(1, 3, size, size, device=device))
    hidden = model(ForwardBatch(torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device),
                                PagedAttention(scratch, meta, attend)))
    rows = hidden[:1].expand(min(config.max_num_seqs, n), -1)
    model.compute_logits(rows).sort(dim=-1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del scratch, hidden, rows
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    used_elsewhere = (total - free) - torch.cuda.memory_allocated()  # other processes, CUDA context
    return total * config.gpu_memory_utilization - used_elsewhere - peak
