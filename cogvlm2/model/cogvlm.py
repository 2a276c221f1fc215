"""The CogVLM2 language model: Llama-3 decoder whose layers carry a visual-expert copy of QKV, dense and MLP.

Parameter names equal the official checkpoint keys (`model.layers.N.self_attn.vision_expert_query_key_value`,
`model.vision...`, `lm_head.weight`), so a checkpoint loads with a strict key check and no name table.
The video family uses the same module names with the language weights only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from . import ops
from .batch import ForwardBatch
from .vision import EVA2CLIPModel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def route(x: torch.Tensor, batch: ForwardBatch, language: Callable, vision: Callable | None) -> torch.Tensor:
    """Apply `language` to language tokens and `vision` to visual-expert tokens of x [N, ...]."""
    if vision is None:
        return language(x)
    if batch.expert_segments is not None:
        return torch.cat([(vision if v else language)(x[a:b]) for a, b, v in batch.expert_segments])
    if batch.vision_idx is None:
        return language(x)
    y_lang = language(x.index_select(0, batch.language_idx))
    y_vis = vision(x.index_select(0, batch.vision_idx))
    out = y_lang.new_empty((x.shape[0], *y_lang.shape[1:]))
    out = out.index_copy(0, batch.language_idx, y_lang)
    return out.index_copy(0, batch.vision_idx, y_vis)


class VisionExpertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = cfg.hidden_size + 2 * self.num_kv_heads * self.head_dim
        self.language_expert_query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        self.language_expert_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        if cfg.has_vision_expert:
            self.vision_expert_query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=True)
            self.vision_expert_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        vis_qkv = getattr(self, "vision_expert_query_key_value", None)
        qkv = route(x, batch, self.language_expert_query_key_value, vis_qkv)  # [N, (Hq + 2 Hkv) d]
        # q [N, Hq, d], k / v [N, Hkv, d]; q and k rotated
        q, k, v = ops.rotary_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        out = batch.attention(self.layer_idx, q, k, v).reshape(n, self.num_heads * self.head_dim)
        return route(out, batch, self.language_expert_dense, getattr(self, "vision_expert_dense", None))


class VisionExpertMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.language_mlp = MLP(cfg)
        if cfg.has_vision_expert:
            self.vision_mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return route(x, batch, self.language_mlp, getattr(self, "vision_mlp", None))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = VisionExpertAttention(cfg, layer_idx)
        self.mlp = VisionExpertMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x), batch)


class RotaryEmbedding(nn.Module):
    """Rotary frequencies and the cos/sin of a step's positions (no state_dict entry: loaded by `load_model`).

    mode "official" (default) reproduces the official code: the frequencies are the checkpoint's
    `rotary_emb.inv_freq` buffer (bf16-rounded in the real checkpoints; the formula when a checkpoint
    has none) held in the model's dtype, and the angles are computed in that dtype, so a bf16 model
    rounds positions above 256 as the official bf16 model does. mode "exact": the formula in float32
    and float32 positions for every dtype (mathematically exact rotary, not what the weights were
    trained with).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.set_frequencies(None, "official")

    def set_frequencies(self, inv_freq: torch.Tensor | None, mode: str) -> None:
        """inv_freq [head_dim/2] from the checkpoint (any dtype; None: the formula)."""
        if mode not in ops.ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {ops.ROPE_MODES}, got {mode!r}")
        formula = ops.inv_freq_formula(self.head_dim, self.theta)
        if inv_freq is not None and tuple(inv_freq.shape) != tuple(formula.shape):
            raise ValueError(f"rotary inv_freq has shape {tuple(inv_freq.shape)}, expected {tuple(formula.shape)}")
        self.mode = mode
        self.source = formula if inv_freq is None else inv_freq.detach().to("cpu", torch.float32)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The frequencies as the official buffer holds them in a `dtype` model (cached per device and dtype,
        so CUDA-graph replays never copy)."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            if self.mode == "exact":
                table = ops.inv_freq_formula(self.head_dim, self.theta)
            else:
                table = self.source.to(dtype)
            self._tables[key] = table.to(device)
        return self._tables[key]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rotary_cos_sin(positions, self.inv_freq(positions.device, dtype))


class CogVLMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision = EVA2CLIPModel(cfg)


class CogVLM2ForCausalLM(nn.Module):
    """Image (visual expert) or video (language weights only) CogVLM2, chosen by the config."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = CogVLMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images or video frames -> [B, tokens_per_image, D] vision-token embeddings."""
        return self.model.vision(pixel_values.to(self.dtype))

    def forward(self, batch: ForwardBatch, output_hidden_states: bool = False):
        """Flat batch -> final hidden states [N, D] (after the last RMSNorm).

        With output_hidden_states, also returns the list the official code reports: input
        embeddings, the output of every layer but the last, then the final normed output.
        """
        h = self.model.embed_tokens(batch.input_ids)  # [N, D]
        if batch.vision_embeds is not None:
            h = h.index_copy(0, batch.vision_embed_idx, batch.vision_embeds.to(h.dtype))
        cos, sin = self.rotary(batch.positions, self.dtype)  # [N, head_dim/2] float32
        hidden = [h]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, batch, cos, sin, use_reentrant=False)
            else:
                h = layer(h, batch, cos, sin)
            hidden.append(h)
        h = self.model.norm(h)
        if output_hidden_states:
            return h, hidden[:-1] + [h]
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
