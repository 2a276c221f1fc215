"""AttentionMetadata: where a step's tokens go in the paged KV cache and what each sequence attends to.

Its own file so that attend kernels (`engine/kernels/`) and `engine/attention.py`, which picks them, both
import it and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to (B sequences, N tokens).

    slot_mapping     [N] long: cache slot (block * block_size + offset) of each new token
    block_tables     [B, W] long: each sequence's blocks, padded with the null block
    context_lens     [B] long: cached tokens of each sequence after this step (new ones included)
    query_start_loc  [B + 1] long: sequence b's new tokens are flat tokens qsl[b] : qsl[b + 1]
    query_lens, context_lens_host: the same as host lists (None under a CUDA graph)
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    query_lens: list[int] | None = None
    context_lens_host: list[int] | None = None
