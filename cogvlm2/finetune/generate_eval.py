"""Generation-based evaluation during training: a few held-out questions answered greedily by the model
being trained, scored against their reference answers (exact match after normalisation, and token F1
as in SQuAD), so a run shows whether the answers improve, not only the held-out loss.

Each held-out conversation is asked its last round, with every earlier round as history (and its
system prompt), exactly as `cogvlm2 chat` would ask it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from ..generation import generate_ids
from ..processing import Processor
from ..sampling_params import SamplingParams
from .data import Conversation

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def prompt_of(conv: Conversation, processor: Processor, template: str | None):
    """(ModelInputs of the conversation's last question, its reference answer)."""
    past, (query, answer) = list(conv.turns[:-1]), conv.turns[-1]
    if conv.system:
        if past:
            past[0] = (f"{conv.system}\n{past[0][0]}", past[0][1])
        else:
            query = f"{conv.system}\n{query}"
    x = processor(query, past, image=conv.image, video=conv.video, template=conv.template or template)
    return x, answer


@torch.no_grad()
def generation_metrics(model: nn.Module, processor: Processor, conversations: Sequence[Conversation],
                       template: str | None = None, max_new_tokens: int = 64, autocast=None) -> dict:
    """Greedy answers to `conversations` -> {"eval/exact_match", "eval/token_f1", "eval/samples"} and the
    answers themselves under "answers" (for the logs)."""
    was_training = model.training
    model.eval()
    em = f1 = 0.0
    answers = []
    try:
        for conv in conversations:
            x, reference = prompt_of(conv, processor, template)
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                ids = [row[0] for row in generate_ids(model, [x], params)]
            stop = set(model.config.eos_token_ids)
            ids = ids[:next((i for i, t in enumerate(ids) if t in stop), len(ids))]
            text = processor.tokenizer.decode(ids).strip()
            em += float(normalize(text) == normalize(reference))
            f1 += token_f1(text, reference)
            answers.append({"source": conv.source, "answer": text, "reference": reference})
    finally:
        model.train(was_training)
    n = max(len(conversations), 1)
    return {"eval/exact_match": em / n, "eval/token_f1": f1 / n, "eval/samples": len(conversations),
            "answers": answers}
