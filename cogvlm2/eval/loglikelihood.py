"""Log-probabilities of continuations given prompts (lmms-eval's `loglikelihood` requests).

The engine returns generated tokens, not prompt log-probabilities, so scoring is one packed prefill
pass of the same model without a KV cache: prompt + continuation of several requests laid back to
back (finetune.packing, causal inside each), an image encoded once however many requests share it,
and only the continuation rows turned into logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..finetune.packing import IGNORE, pack
from ..model.cogvlm import CogVLM2ForCausalLM
from ..model.registry import family_of
from ..processing.prompt import LANGUAGE, ModelInputs


def with_continuation(prompt: ModelInputs, continuation: Sequence[int]) -> ModelInputs:
    """prompt + continuation ids (language tokens, positions counting on), labels on the continuation only."""
    if not continuation:
        raise ValueError("the continuation is empty")
    n, start = len(continuation), prompt.next_position
    return ModelInputs(prompt.input_ids + list(continuation), prompt.token_type_ids + [LANGUAGE] * n,
                       prompt.position_ids + list(range(start, start + n)), prompt.pixel_values, prompt.vision_hash,
                       [IGNORE] * len(prompt) + list(continuation), prompt.prompt_text)


@torch.inference_mode()
def _score_packed(model: CogVLM2ForCausalLM, examples: list[ModelInputs]) -> list[tuple[float, bool]]:
    batch = pack(examples, has_vision_expert=family_of(model.config).vision_expert).to(model.device)
    embeds = None
    if batch.pixel_values is not None:
        unique: dict[str, int] = {}
        pixels, order = [], []
        for x in examples:
            if x.pixel_values is None:
                continue
            key = x.vision_hash or f"#{len(unique)}"
            if key not in unique:
                unique[key] = len(pixels)
                pixels.append(x.pixel_values if x.pixel_values.dim() == 4 else x.pixel_values[None])
            order.append(unique[key])
        feats = model.encode_images(torch.cat(pixels).to(model.device))  # [n_unique (x frames), tokens, D]
        per = [feats[sum(p.shape[0] for p in pixels[:i]):][:pixels[i].shape[0]] for i in range(len(pixels))]
        embeds = torch.cat([per[i].reshape(-1, feats.shape[-1]) for i in order])  # [M, D] in token order
    logits = model.compute_logits(model(batch.forward_batch(embeds)).index_select(0, batch.target_idx))  # [T, V] float32
    logprobs = logits.log_softmax(-1).gather(1, batch.target_ids[:, None]).squeeze(1)  # [T]
    greedy = logits.argmax(-1) == batch.target_ids
    owner = torch.bucketize(batch.target_idx, batch.cu_seqlens[1:], right=True)  # example of each target
    zeros = torch.zeros(len(examples), dtype=torch.float64, device=logits.device)
    total = zeros.index_add(0, owner, logprobs.double())
    misses = zeros.index_add(0, owner, (~greedy).double())
    return [(float(t), int(m) == 0) for t, m in zip(total.tolist(), misses.tolist())]


def loglikelihoods(model: CogVLM2ForCausalLM, requests: Sequence[tuple[ModelInputs, Sequence[int]]],
                   max_batch_tokens: int = 16384) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | prompt), whether greedy decoding would produce it) per request."""
    examples = [with_continuation(p, c) for p, c in requests]
    out: list[tuple[float, bool]] = []
    start = 0
    while start < len(examples):
        end, tokens = start, 0
        while end < len(examples) and (end == start or tokens + len(examples[end]) <= max_batch_tokens):
            tokens += len(examples[end])
            end += 1
        out += _score_packed(model, examples[start:end])
        start = end
    return out
