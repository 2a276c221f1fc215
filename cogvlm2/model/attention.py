"""Reference attention backends in plain torch SDPA: a padded batch with a contiguous KV cache, and
packed variable-length sequences without a cache (training).

These are the simple, obviously-correct paths that faster backends (the paged engine) are tested
against. The padded one reproduces the official batch demo exactly: right padding, padded keys
masked out of every query (a padded query included), causal inside each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PaddedKVCache:
    """KV cache for B rows of equal length; each step appends `step_len` tokens to every row.

    The flat tokens of a step are row-major: token (row b, offset i) is flat index b * step_len + i.
    """

    def __init__(self, batch_size: int, num_layers: int):
        self.batch_size = batch_size
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None  # [B, T] bool: keys that may be attended
        self.step_len = 0
        self.mask: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}  # the step's mask on other devices (pipeline stages)

    @property
    def length(self) -> int:
        return 0 if self.key_valid is None else self.key_valid.shape[1]

    def begin_step(self, valid: torch.Tensor) -> None:
        """valid [B, step_len] bool: False for padding. Builds this step's [B, 1, L, T] mask once."""
        past = self.length
        self.key_valid = valid if self.key_valid is None else torch.cat([self.key_valid, valid], dim=1)
        self.step_len = valid.shape[1]
        total = self.key_valid.shape[1]
        q_pos = torch.arange(past, total, device=valid.device)[:, None]
        causal = torch.arange(total, device=valid.device)[None, :] <= q_pos  # [L, T]
        self.mask = (causal[None] & self.key_valid[:, None, :])[:, None]  # [B, 1, L, T]
        self._masks = {}

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        if self.mask.device == device:
            return self.mask
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n = self.batch_size, self.step_len
        q = q.view(b, n, *q.shape[1:]).transpose(1, 2)  # [B, Hq, L, d]
        k = k.view(b, n, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, L, d]
        v = v.view(b, n, *v.shape[1:]).transpose(1, 2)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask_on(q.device), enable_gqa=True)  # [B, Hq, L, d]
        return out.transpose(1, 2).reshape(b * n, out.shape[1], out.shape[3])  # [N, Hq, d]


class PackedAttention:
    """No cache: several sequences packed back to back, causal inside each (training, scoring).

    cu_seqlens [S + 1] long: sequence s occupies flat tokens cu_seqlens[s] : cu_seqlens[s + 1].
    Each sequence gets its own causal SDPA call, so the flash / cuDNN kernels serve it (a dense
    block-diagonal mask would force the slower masked kernels and O(N^2) mask memory).

    Grouped-query heads: bf16 / fp16 on CUDA hand SDPA the Hkv key / value heads as they are
    (enable_gqa: the flash kernel reads each K/V head for its group of query heads, and autograd
    saves Hkv heads, not Hq copies); elsewhere (fp32, CPU) K/V are repeated to Hq heads first, which
    keeps the fp32 memory-efficient kernel eligible. Both compute the same attention.
    """

    def __init__(self, cu_seqlens: torch.Tensor | list[int]):
        bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        self.ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        native_gqa = group > 1 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        outs = []
        for a, b in self.ranges:
            qs = q[a:b].transpose(0, 1)[None]  # [1, Hq, n, d]
            ks, vs = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [Hkv, n, d]
            if not native_gqa and group > 1:
                ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)  # [Hq, n, d]
            out = F.scaled_dot_product_attention(qs, ks[None], vs[None], is_causal=True, enable_gqa=native_gqa)
            outs.append(out[0].transpose(0, 1))  # [n, Hq, d]
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # [N, Hq, d]
