"""The streaming clean-up: deltas cleaned piecewise add up to the clean-up of the whole text, for any chunking."""

from __future__ import annotations

import random

from cogvlm2.processing.detokenizer import final_length
from cogvlm2.processing.tokenizer import clean_up_tokenization


def _stream(chunks: list[str]) -> str:
    """What IncrementalDetokenizer._emit does with raw deltas: emit the cleaned final part, hold the rest."""
    out, pending = [], ""
    for chunk in chunks:
        pending += chunk
        cut = final_length(pending)
        out.append(clean_up_tokenization(pending[:cut]))
        pending = pending[cut:]
    out.append(clean_up_tokenization(pending))
    return "".join(out)


def test_held_back_tails():
    assert final_length("I do n") == len("I do")  # " n" + "'t" -> "n't"
    assert final_length("it '") == len("it")
    assert final_length("a ' ") == len("a")  # " ' " -> "'": the quote's leading space is undecided too
    assert final_length("x ' n") == len("x")  # " ' " then " n": cut before the quote, not inside " ' "
    assert final_length("The answer") == len("The answer")
    assert final_length("42 ") == len("42")


def test_any_chunking_equals_whole_clean_up():
    rng = random.Random(0)
    pieces = [" ", "'", "n", "t", "s", ".", ",", "?", "!", "x", "m", "v", "e", "r", " n't", " 's", " '", "ab"]
    for _ in range(3000):
        chunks = [rng.choice(pieces) for _ in range(rng.randint(1, 12))]
        assert _stream(chunks) == clean_up_tokenization("".join(chunks)), chunks
