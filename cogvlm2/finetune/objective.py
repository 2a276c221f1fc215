"""The training objective as one module: pixels + packed tokens -> summed next-token cross-entropy.

Vision encoding, the decoder pass and the loss all happen inside one `forward` call, because that is
what DeepSpeed ZeRO-3 and FSDP hook to gather and release sharded parameters (a later call to
`model.compute_logits` outside `forward` would find lm_head already resharded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.cogvlm import CogVLM2ForCausalLM
from .packing import PackedBatch


class CausalLMLoss(nn.Module):
    def __init__(self, model: CogVLM2ForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Sum (not mean) of the cross-entropy over batch.target_ids, float32 scalar; the caller
        normalises by the number of target tokens of the whole optimizer step."""
        m = self.model
        embeds = None
        if batch.pixel_values is not None:
            feats = m.encode_images(batch.pixel_values)  # [n, tokens_per_image, D]
            embeds = feats.reshape(-1, feats.shape[-1])  # [M, D]
        hidden = m(batch.forward_batch(embeds))  # [N, D]
        logits = m.compute_logits(hidden.index_select(0, batch.target_idx))  # [T, V] float32, labelled rows only
        return F.cross_entropy(logits, batch.target_ids, reduction="sum")
