"""EVA2-CLIP-E vision tower + 2x2 conv + GLU adapter: pixels -> the embeddings of the vision tokens.

Parameter names equal the official checkpoint keys under `model.vision.`. The tower is post-norm
(LayerNorm on each sub-layer's *output*, then the residual add), which is what the official
EVA2-CLIP code does and what the weights were trained with.

With a `ParallelContext` (tensor parallelism with `shard_vision`) the tower's transformer is sharded
Megatron-style like the language model: QKV column-parallel by heads, attention dense row-parallel,
fc1 column-parallel, fc2 row-parallel, one all-reduce after each attention and each MLP (126 for the
63 layers of the 19B tower); the patch embedding, the 2x2 conv and the GLU adapter stay replicated.
Every rank ends with the same features. Without it (the default) every rank holds the whole tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, VisionConfig
from . import ops, vit_attention
from .parallel import ParallelContext, tp_size


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_embedding = nn.Parameter(torch.empty(1, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, grid*grid, Dv]
        cls = self.cls_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + grid*grid, Dv]
        return x + self.position_embedding.weight.unsqueeze(0)


class RowParallelLinear(nn.Linear):
    """A row-parallel linear (input features split over the ranks): partial products all-reduced, then
    the bias, which every rank holds whole, added once."""

    def __init__(self, in_features: int, out_features: int, tp: ParallelContext):
        super().__init__(in_features, out_features)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight)) + self.bias


def _linear(in_features: int, out_features: int, tp: ParallelContext | None) -> nn.Linear:
    """A row-parallel linear under tensor parallelism (in_features already this rank's share), else nn.Linear."""
    return nn.Linear(in_features, out_features) if tp is None else RowParallelLinear(in_features, out_features, tp)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: ParallelContext | None = None):
        super().__init__()
        n = tp_size(tp)  # this rank's heads
        self.num_heads = cfg.num_heads // n
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size // n)
        self.dense = _linear(cfg.hidden_size // n, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        """`shared`: x already quantized for an fp8 QKV (ops.add_layer_norm's)."""
        b, n, _ = x.shape
        qkv = self.query_key_value(x) if shared is None else self.query_key_value(x, shared)
        qkv = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
        # Full (non-causal) attention, scale head_dim**-0.5 (SDPA's default; vit_attention picks the backend). A
        # quantized projection's class may say how to attend over its outputs (fp8: `Fp8Linear.attention`)
        attend = getattr(type(self.query_key_value), "attention", None) or vit_attention.attention
        out = attend(qkv[0], qkv[1], qkv[2])  # [B, H, N, d]
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: ParallelContext | None = None):
        super().__init__()
        inter = cfg.intermediate_size // tp_size(tp)
        self.fc1 = nn.Linear(cfg.hidden_size, inter)
        self.fc2 = _linear(inter, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        """`shared`: x already quantized for an fp8 fc1 (ops.add_layer_norm's)."""
        h = self.fc1(x) if shared is None else self.fc1(x, shared)
        if hasattr(type(self.fc2), "forward_gelu"):  # a quantized fc2 applies the GELU in its own input pass
            return self.fc2.forward_gelu(h)  # (looked up on the class: a wrapper, e.g. LoRA, never forwards it)
        return self.fc2(F.gelu(h))  # exact (erf) GELU


class TransformerLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: ParallelContext | None = None):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))  # post-norm: LN on the sub-layer output
        return x + self.post_attention_layernorm(self.mlp(x))

    def forward_fused(self, x: torch.Tensor, shared, next_qkv: nn.Module | None) -> tuple[torch.Tensor, object]:
        """forward with each residual add and its LayerNorm in one kernel (ops.add_layer_norm): `shared` is x
        quantized for this layer's QKV (or None); returns (output, output quantized for `next_qkv` or None)."""
        x, shared = ops.add_layer_norm(x, self.attention(x, shared), self.input_layernorm, self.mlp.fc1)
        return ops.add_layer_norm(x, self.mlp(x, shared), self.post_attention_layernorm, next_qkv)


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: ParallelContext | None = None):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # set by fine-tuning when the tower itself is trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.VISION_ADD_NORM and ops._fused(x):  # inference on the GPU (autograd off): the fused residual
            shared = None
            for i, layer in enumerate(self.layers):
                nxt = self.layers[i + 1].attention.query_key_value if i + 1 < len(self.layers) else None
                x, shared = layer.forward_fused(x, shared, nxt)
            return x
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter from the tower's width to the LM's: linear -> LayerNorm -> GELU -> SwiGLU-style MLP."""

    def __init__(self, cfg: ModelConfig, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, cfg.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(cfg.hidden_size)  # eps 1e-5, the PyTorch default the official code uses
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelContext | None = None):
        """tp: shard the transformer over these ranks (None: the whole tower)."""
        super().__init__()
        v = cfg.vision
        self.grid = v.grid_size
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = Transformer(v, tp)
        self.linear_proj = GLU(cfg, in_features=v.hidden_size)
        self.conv = nn.Conv2d(v.hidden_size, v.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (B images or video frames) -> [B, tokens_per_image, D] incl. boi/eoi rows."""
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # drop the class token: [B, grid*grid, Dv]
        b, _, dv = x.shape
        x = x.view(b, self.grid, self.grid, dv).permute(0, 3, 1, 2)  # [B, Dv, grid, grid]
        x = self.conv(x).flatten(2).transpose(1, 2)  # [B, (grid/2)^2, Dv], row-major
        x = self.linear_proj(x)  # [B, (grid/2)^2, D]
        return torch.cat([self.boi.expand(b, 1, -1), x, self.eoi.expand(b, 1, -1)], dim=1)
