"""The CogVLM2 language model: Llama-3 decoder whose layers carry a visual-expert copy of QKV, dense and MLP.

Parameter names equal the official checkpoint keys (`model.layers.N.self_attn.vision_expert_query_key_value`,
`model.vision...`, `lm_head.weight`), so a checkpoint loads with a strict key check and no name table.
The video family uses the same module names with the language weights only.

With a `ParallelContext` of N ranks (`parallel.py`) the same modules hold one rank's shard: fewer heads and
intermediate features, 1/N of the vocabulary, and one all-reduce after each attention and MLP block.
With `PipelineStages` (`pipeline.py`) consecutive layers live on different devices and the forward moves
the activations at each stage boundary.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from . import ops
from .batch import ForwardBatch
from .parallel import ParallelContext, VocabParallelEmbedding, tp_size
from .vision import EVA2CLIPModel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelContext | None = None):
        super().__init__()
        inter = cfg.intermediate_size // tp_size(tp)  # gate/up column-parallel, down row-parallel
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        """`shared`: x already prepared for gate and up by the kernel that made it (ops.add_rms_norm_a8)."""
        return ops.mlp(self.gate_proj, self.up_proj, self.down_proj, x, shared)


def fuse_gate_up(model: nn.Module) -> int:
    """Every language-model MLP's gate and up weights as the two halves of one [2 x intermediate, hidden] tensor, in
    place (ops.FUSE_GATE_UP: one GEMM for 2+ rows): the two parameters become views of it, so loading into them,
    merging an adapter into them and state_dict see the same values. For inference (the engine calls it on CUDA
    models; the views share storage, which a safetensors save refuses). Only plain bias-free nn.Linear pairs of one
    device and dtype; each pair's old tensors are returned to the driver before the next is joined, so the peak
    grows by one pair. Returns how many MLPs it fused."""
    fused = 0
    for mlp in model.modules():
        if not isinstance(mlp, MLP):
            continue
        g, u = mlp.gate_proj, mlp.up_proj
        if not (type(g) is type(u) is nn.Linear and g.bias is None and u.bias is None
                and g.weight.device == u.weight.device and g.weight.device.type != "meta"
                and g.weight.dtype == u.weight.dtype and g.weight.shape[1:] == u.weight.shape[1:]):
            continue
        both = getattr(g, "gate_up_weight", None)
        if both is not None and ops.halves_of(both, g.weight, u.weight):
            continue  # already fused
        with torch.no_grad():
            both = torch.cat([g.weight, u.weight])
        n = g.weight.shape[0]
        g.weight = nn.Parameter(both[:n], requires_grad=False)
        u.weight = nn.Parameter(both[n:], requires_grad=False)
        g.gate_up_weight = both
        fused += 1
        if both.is_cuda:
            torch.cuda.empty_cache()  # the pair's old blocks, so the next pair's cat can reuse their memory
    return fused


def route(x: torch.Tensor, batch: ForwardBatch, language: Callable, vision: Callable | None) -> torch.Tensor:
    """Apply `language` to the language tokens and `vision` to the visual-expert tokens of x [N, ...].

    Each expert is called once, on the joined rows of its segments (a row slice, no copy, when they are
    one run), and the outputs are put back in token order: DeepSpeed ZeRO-3 gathers an expert's shards
    at each call, so every rank must make the same calls however many images its batch holds.
    """
    if vision is None or not batch.expert_segments:
        return language(x)
    y_vis = vision(_rows(x, batch.expert_segments))
    if not batch.language_segments:
        return y_vis
    y_lang = language(_rows(x, batch.language_segments))
    return torch.cat([(y_vis if v else y_lang)[o:o + n] for v, o, n in batch.routed_runs])


def _rows(x: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """The rows of x in the segments, in order."""
    if len(segments) == 1:
        return x[segments[0][0]:segments[0][1]]
    return torch.cat([x[a:b] for a, b in segments])


class VisionExpertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: ParallelContext | None = None):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        n = tp_size(tp)  # this rank's heads: QKV column-parallel by heads, dense row-parallel
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
        self.head_dim = cfg.head_dim
        q_size = self.num_heads * self.head_dim
        qkv_out = q_size + 2 * self.num_kv_heads * self.head_dim
        self.language_expert_query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        self.language_expert_dense = nn.Linear(q_size, cfg.hidden_size, bias=False)
        if cfg.has_vision_expert:
            self.vision_expert_query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=True)
            self.vision_expert_dense = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor,
                shared=None) -> torch.Tensor:
        """`shared`: x prepared for the language QKV by the kernel that made it (language rows only)."""
        n = x.shape[0]
        vis_qkv = getattr(self, "vision_expert_query_key_value", None)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim)
        # q [N, Hq, d], k / v [N, Hkv, d]; q and k rotated
        if vis_qkv is None or not batch.expert_segments:  # language rows only (decode): projection + rotary (+ the
            # K/V store where the backend says where) may fuse
            where = getattr(batch.attention, "kv_destination", None)
            q, k, v, stored = ops.qkv_rotary(self.language_expert_query_key_value, x, cos, sin, *heads,
                                             store=where(self.layer_idx) if where is not None else None,
                                             shared=shared)
        else:
            qkv = route(x, batch, partial(ops.linear, self.language_expert_query_key_value), vis_qkv)  # [N, (Hq+2Hkv)d]
            (q, k, v), stored = ops.rotary_qkv(qkv, cos, sin, *heads), False
        out = batch.attention(self.layer_idx, q, k, v, stored=True) if stored else \
            batch.attention(self.layer_idx, q, k, v)
        out = out.reshape(n, self.num_heads * self.head_dim)
        dense = partial(ops.linear, self.language_expert_dense)
        out = route(out, batch, dense, getattr(self, "vision_expert_dense", None))
        return out if self.tp is None else self.tp.all_reduce(out)  # one reduce for both experts


class VisionExpertMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelContext | None = None):
        super().__init__()
        self.tp = tp
        self.language_mlp = MLP(cfg, tp)
        if cfg.has_vision_expert:
            self.vision_mlp = MLP(cfg, tp)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, shared=None) -> torch.Tensor:
        """`shared`: x prepared for the language MLP (language rows only)."""
        if shared is not None and not batch.expert_segments:
            out = self.language_mlp(x, shared)
        else:
            out = route(x, batch, self.language_mlp, getattr(self, "vision_mlp", None))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: ParallelContext | None = None):
        super().__init__()
        self.self_attn = VisionExpertAttention(cfg, layer_idx, tp)
        self.mlp = VisionExpertMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x), batch)

    def forward_residual(self, x: torch.Tensor, normed: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor,
                         sin: torch.Tensor, next_norm: RMSNorm, normed_a8=None,
                         next_qkv: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, object]:
        """The same layer on the residual stream: x is its input and `normed` its input_layernorm(x); returns
        (output, next_norm(output), a8), each residual add done in one kernel with the RMSNorm after it. With
        ops.FOLD_A8 on language rows, the RMSNorm kernels also quantize their row for the W4A8 layers that read it
        (this layer's MLP; `next_qkv`, the next layer's language QKV: a8, passed back as its `normed_a8`)."""
        post = self.post_attention_layernorm
        language = not batch.expert_segments
        mlp = self.mlp.language_mlp
        group = ops.a8_group((mlp.gate_proj, mlp.up_proj), normed) if language else 0
        x, h, h_a8 = ops.add_rms_norm_a8(x, self.self_attn(normed, batch, cos, sin, normed_a8), post.weight, post.eps,
                                         group)
        group = ops.a8_group((next_qkv,), normed) if language and next_qkv is not None else 0
        return ops.add_rms_norm_a8(x, self.mlp(h, batch, h_a8), next_norm.weight, next_norm.eps, group)


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
    def __init__(self, cfg: ModelConfig, tp: ParallelContext | None = None):
        super().__init__()
        if tp is None:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision = EVA2CLIPModel(cfg, tp if tp is not None and tp.shard_vision else None)


class CogVLM2ForCausalLM(nn.Module):
    """Image (visual expert) or video (language weights only) CogVLM2, chosen by the config.

    tp: this process's rank of a tensor-parallel group (None: the whole model). `stages` (set by
    `pipeline.place`) spreads the layers over devices; None: one device.
    """

    def __init__(self, cfg: ModelConfig, tp: ParallelContext | None = None):
        super().__init__()
        if tp is not None:
            tp.check(cfg)
        self.config, self.tp = cfg, tp
        self.model = CogVLMModel(cfg, tp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // tp_size(tp), bias=False)  # vocab-parallel
        self.rotary = RotaryEmbedding(cfg)
        self.stages = None
        self.gradient_checkpointing = False
        # the layers on the residual stream (DecoderLayer.forward_residual): where the fused kernels run (CUDA,
        # autograd off) the 64 residual adds of a step are fused into the RMSNorms after them, elsewhere the same
        # torch ops run in the same order; the same numbers bit for bit either way. Set by the engine's Worker,
        # which owns the model; off for everything else: a layer of a model sharded for training (FSDP, ZeRO-3)
        # is gathered by hooks on its own call, and forward_residual reads the next layer's norm weight
        self.residual_stream = False

    # the final norm's weight: on the last stage with lm_head, in the compute dtype, and a plain parameter
    # whatever wraps lm_head (a LoRA target, a quantized linear)
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this model (this rank's shard under tensor parallelism) keeps in a KV cache."""
        return self.config.num_key_value_heads // tp_size(self.tp)

    def layer_devices(self) -> list[torch.device]:
        """The device of each decoder layer (several under pipeline stages): where its KV cache lives."""
        return [layer.input_layernorm.weight.device for layer in self.model.layers]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images or video frames -> [B, tokens_per_image, D] vision-token embeddings
        (on the vision tower's device)."""
        if self.stages is not None:
            pixel_values = self.stages.move(pixel_values, self.stages.vision_device)
        return self.model.vision(pixel_values.to(self.dtype))

    def forward(self, batch: ForwardBatch, output_hidden_states: bool = False):
        """Flat batch -> final hidden states [N, D] (after the last RMSNorm).

        With output_hidden_states, also returns the list the official code reports: input
        embeddings, the output of every layer but the last, then the final normed output. On one device
        with `residual_stream` set (the engine) the layers run on the residual stream
        (`DecoderLayer.forward_residual`), which computes the same numbers.
        """
        if self.stages is not None:
            batch = self.stages.batch_to(batch, self.stages.embed_device)
        h = self.model.embed_tokens(batch.input_ids)  # [N, D]
        if batch.vision_embeds is not None:
            h = h.index_copy(0, batch.vision_embed_idx, batch.vision_embeds.to(h.dtype))
        cos, sin = self.rotary(batch.positions, self.dtype)  # [N, head_dim/2] float32
        if self.residual_stream and self.stages is None and not output_hidden_states and not (
                self.gradient_checkpointing and self.training):
            layers = self.model.layers
            normed, a8 = layers[0].input_layernorm(h), None
            for i, layer in enumerate(layers):
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                h, normed, a8 = layer.forward_residual(
                    h, normed, batch, cos, sin, nxt.input_layernorm if nxt is not None else self.model.norm, a8,
                    nxt.self_attn.language_expert_query_key_value if nxt is not None else None)
            return normed
        hidden = [h]
        for i, layer in enumerate(self.model.layers):
            if self.stages is not None:  # explicit hand-over at a stage boundary (no-op inside a stage)
                h, batch, cos, sin = self.stages.enter_layer(i, h, batch, cos, sin)
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, batch, cos, sin, use_reentrant=False)
            else:
                h = layer(h, batch, cos, sin)
            hidden.append(h)
        if self.stages is not None:
            h = self.stages.to_head(h)
        h = self.model.norm(h)
        if output_hidden_states:
            return h, hidden[:-1] + [h]
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> float32 logits [B, V] (under tensor parallelism: gathered, equal on every rank)."""
        logits = ops.linear(self.lm_head, hidden).float()
        return logits if self.tp is None else self.tp.all_gather(logits, dim=-1)
