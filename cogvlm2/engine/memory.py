"""How many KV blocks fit: on CUDA, free memory after the weights and a profiling step; on CPU, a fixed cap."""

from __future__ import annotations

from collections import Counter

import torch

from ..devices import release_cached_memory
from ..model.batch import ForwardBatch
from ..model.cogvlm import CogVLM2ForCausalLM
from .attention import Attend, AttentionMetadata, KVCache, PagedAttention
from .config import CPU_KV_CACHE_BYTES, CPU_KV_CACHE_SEQS, VISION_PIXELS, EngineConfig


def num_kv_blocks(model: CogVLM2ForCausalLM, config: EngineConfig, attend: Attend) -> int:
    """config.num_kv_blocks when given, else sized as above; raises unless one sequence of max_model_len fits
    (the scheduler relies on it: the oldest running sequence can always make progress).

    A block holds the model's own KV heads (1/N of them on a tensor-parallel rank); under pipeline stages
    each device holds its layers' part of every block, and the device with the least room decides."""
    cfg = model.config
    # before the pool is sized and allocated: a dropped engine's cached pool would count as memory used elsewhere,
    # and the new pool, carved out of it, would pin it (devices.release_cached_memory)
    release_cached_memory(model.layer_devices())
    per_block = KVCache.bytes_per_block(cfg.num_hidden_layers, config.block_size, model.num_local_kv_heads,
                                        cfg.head_dim, model.dtype)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif model.device.type != "cuda":
        blocks = min(CPU_KV_CACHE_BYTES // per_block, CPU_KV_CACHE_SEQS * config.max_blocks_per_seq)
    else:
        layers = Counter(model.layer_devices())
        free, held = _free_cuda_bytes_after_profile(model, config, attend)
        blocks = min(int(free[d] // (per_block * n / cfg.num_hidden_layers)) for d, n in layers.items())
    if blocks < config.max_blocks_per_seq:
        fix = "raise num_kv_blocks" if config.num_kv_blocks is not None else "raise gpu_memory_utilization"
        raise ValueError(f"the KV cache holds {blocks} blocks of {config.block_size} tokens, fewer than one sequence "
                         f"of max_model_len={config.max_model_len} needs ({config.max_blocks_per_seq}); lower "
                         f"max_model_len or {fix}{_held_hint(held) if config.num_kv_blocks is None else ''}")
    return blocks


def _held_hint(held: dict[torch.device, int]) -> str:
    """What to do when this process's allocator holds free memory it cannot give back (counted as used elsewhere)."""
    device, size = max(held.items(), key=lambda item: item[1])
    if size < 2**30:
        return ""
    return (f". This process holds {size / 2**30:.1f} GiB on {device} that it cannot free: cached blocks of a segment "
            "that a live tensor shares (typically an earlier engine's KV pool, dropped, then split for tensors "
            "allocated before this engine): drop every reference to the earlier engine and call gc.collect() and "
            "torch.cuda.empty_cache() before allocating anything else, or size the cache with num_kv_blocks")


@torch.inference_mode()
def _free_cuda_bytes_after_profile(model: CogVLM2ForCausalLM, config: EngineConfig,
                                   attend: Attend) -> tuple[dict[torch.device, float], dict[torch.device, int]]:
    """Run the largest step (the vision tower's largest pass, max_num_batched_tokens prompt tokens,
    max_num_seqs logits + sort) on a throwaway cache, then per device holding layers: budget = total * utilization -
    everything else at its peak."""
    cfg, device = model.config, model.device
    devices = sorted(set(model.layer_devices()) | {device}, key=str)
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    n = min(config.max_num_batched_tokens, config.max_model_len)
    scratch = KVCache(cfg.num_hidden_layers, -(-n // config.block_size), config.block_size,
                      model.num_local_kv_heads, cfg.head_dim, model.dtype, model.layer_devices())
    blocks = torch.arange(scratch.num_blocks, device=device)
    meta = AttentionMetadata(torch.arange(n, device=device), blocks[None], torch.tensor([n], device=device),
                             torch.tensor([0, n], device=device), [n], [n])
    size = cfg.vision.image_size  # the largest pass of the tower a step makes (runner: VISION_PIXELS)
    model.encode_images(torch.zeros(tower_pass(size, cfg.max_media_items, config), 3, size, size, device=device))
    hidden = model(ForwardBatch(torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device),
                                PagedAttention(scratch, meta, attend)))
    rows = hidden[:1].expand(min(config.max_num_seqs, n), -1)
    model.compute_logits(rows).sort(dim=-1)
    budget = {}
    for d in devices:
        torch.cuda.synchronize(d)
        budget[d] = torch.cuda.max_memory_allocated(d)
    del scratch, hidden, rows
    release_cached_memory(devices)
    held = {}
    for d, peak in budget.items():
        free, total = torch.cuda.mem_get_info(d)
        used_elsewhere = (total - free) - torch.cuda.memory_allocated(d)  # other processes, CUDA context
        budget[d] = total * config.gpu_memory_utilization - used_elsewhere - peak
        held[d] = torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
    return budget, held


def tower_pass(image_size: int, max_media_items: int, config: EngineConfig) -> int:
    """Images (or video frames) of image_size^2 in the largest pass of the vision tower a step can make: as many as
    VISION_PIXELS holds, no more than the step's sequences can bring (max_num_seqs prompts of at most
    max_media_items images or frames each), at least one."""
    return max(1, min(VISION_PIXELS // (image_size * image_size), config.max_num_seqs * max_media_items))
