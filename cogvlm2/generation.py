"""The simple reference generation loop: padded batch, contiguous KV cache, one token per step.

Kept plain on purpose: every faster path (the paged engine, CUDA graphs) is tested token for token
against it. It reproduces the official batch demo, right padding included.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, Sequence

import torch

from .model.attention import PaddedKVCache
from .model.batch import ForwardBatch, TokenSpan, flatten
from .model.cogvlm import CogVLM2ForCausalLM
from .processing.detokenizer import IncrementalDetokenizer
from .processing.prompt import ModelInputs, position_ids
from .processing.tokenizer import Tokenizer
from .sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, generated: Sequence[int], p: SamplingParams) -> torch.Tensor:
    """logits [V] float32; seen = prompt + generated ids (repetition), generated (presence/frequency)."""
    if p.repetition_penalty != 1.0 and seen.numel():
        ids = seen.unique()
        scores = logits[ids]
        logits[ids] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(generated):
        ids, counts = torch.tensor(list(generated), device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one id from float32 logits [V] (penalties already applied)."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def clamp_to_positions(params: SamplingParams, next_position: int, max_position_embeddings: int) -> SamplingParams:
    """params with max_new_tokens cut to the rotary positions left after a prompt whose first generated
    token sits at next_position (with a warning); ValueError when the prompt leaves none."""
    budget = max_position_embeddings - next_position + 1
    if budget < 1:
        raise ValueError(f"the prompt spans {next_position} positions, more than the model's "
                         f"max_position_embeddings={max_position_embeddings}")
    if params.max_new_tokens <= budget:
        return params
    warnings.warn(f"max_new_tokens={params.max_new_tokens} cut to {budget}: the prompt spans {next_position - 1} of "
                  f"the model's {max_position_embeddings} positions", stacklevel=3)
    return dataclasses.replace(params, max_new_tokens=budget)


def _padded(x: ModelInputs, width: int, pad_id: int) -> TokenSpan:
    """A prompt right-padded to `width` as the official batch demo pads it: pad ids that do not advance
    the position, use the language weights and are masked out of attention."""
    s, n_pad = x.span(), width - len(x)
    ok = [True] * len(x) + [False] * n_pad
    return TokenSpan(s.input_ids + [pad_id] * n_pad, position_ids(x.token_type_ids + [0] * n_pad, ok),
                     s.expert_segments, s.vision_slots)


@torch.inference_mode()
def generate_ids(model: CogVLM2ForCausalLM, batch: Sequence[ModelInputs], params: SamplingParams,
                 output_logits: list | None = None) -> Iterator[list[int]]:
    """Yield one new token per row per step (rows right-padded like the official batch demo).

    Stops when every row has met a stop id / EOS (unless ignore_eos) or max_new_tokens. A finished
    row keeps being fed (as the official code does) but its later tokens are not reported: the
    caller stops reading a row after its stop id. If `output_logits` is a list, each step's float32
    logits [B, V] are appended to it.
    """
    cfg, device = model.config, model.device
    b = len(batch)
    width = max(len(x) for x in batch)
    rows = flatten(_padded(x, width, pad_id=cfg.eos_token_ids[0]) for x in batch)
    positions = torch.tensor(rows.positions).view(b, width)
    params = clamp_to_positions(params, int(positions.max()) + 1, cfg.max_position_embeddings)
    cache = PaddedKVCache(b, cfg.num_hidden_layers)
    valid = torch.arange(width)[None, :] < torch.tensor([len(x) for x in batch])[:, None]  # [B, L]
    cache.begin_step(valid.to(device))
    embeds = None
    pixels = [x.pixel_values for x in batch if x.pixel_values is not None]
    if pixels:
        feats = model.encode_images(torch.cat(pixels).to(device))  # [n_images_or_frames, per, D]
        embeds = feats.reshape(-1, feats.shape[-1])
    hidden = model(rows.to_batch(cache, embeds, device)).view(b, -1, cfg.hidden_size)
    logits = model.compute_logits(hidden[:, -1])  # [B, V]: the last column, as the official demo
    next_pos = positions.max(dim=1).values + 1  # [B]
    stops = params.stop_ids(cfg.eos_token_ids)
    generators = [torch.Generator(device=logits.device).manual_seed(params.seed + i) if params.seed is not None
                  else None for i in range(b)]
    generated: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    prompts = [torch.tensor(x.input_ids, device=logits.device) for x in batch]
    for step in range(params.max_new_tokens):
        if output_logits is not None:
            output_logits.append(logits.clone())
        tokens = []
        for r in range(b):
            seen = torch.cat([prompts[r], torch.tensor(generated[r], dtype=torch.long, device=logits.device)])
            row = apply_penalties(logits[r].clone(), seen, generated[r], params)
            tokens.append(sample_token(row, params, generators[r]))
            generated[r].append(tokens[-1])
            done[r] = done[r] or tokens[-1] in stops
        yield tokens
        if all(done) or step + 1 == params.max_new_tokens:
            return
        cache.begin_step(torch.ones(b, 1, dtype=torch.bool, device=device))
        fb = ForwardBatch(torch.tensor(tokens, device=device), next_pos.to(device), cache)
        logits = model.compute_logits(model(fb))
        next_pos = next_pos + 1


def stream_text(model: CogVLM2ForCausalLM, tokenizer: Tokenizer, inputs: ModelInputs,
                params: SamplingParams) -> Iterator[str]:
    """Generate for one prompt and yield text deltas as they complete (UTF-8 safe, stop strings cut)."""
    detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
    stops = params.stop_ids(model.config.eos_token_ids)
    held = ""  # text not yet emitted because it may be the start of a stop string
    hold = max((len(s) for s in params.stop), default=0)
    for (token,) in generate_ids(model, [inputs], params):
        if token in stops:
            break
        held += detok.push(token)
        cut = min((i for i in (held.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            if held[:cut]:
                yield held[:cut]
            return
        if len(held) > hold:
            emit, held = (held[:len(held) - hold + 1], held[len(held) - hold + 1:]) if hold else (held, "")
            yield emit
    held += detok.flush()
    cut = min((i for i in (held.find(s) for s in params.stop) if i >= 0), default=len(held))
    if held[:cut]:
        yield held[:cut]
