"""TextStream: one request's generated ids -> text deltas, held back and cut at stop strings.

Stop semantics equal `generation.stream_text`: text that might be the start of a stop string is held
back until it can't be; a stop string is cut from the text together with everything after it; at the
end (a stop id, a length limit) the held-back text is released. The engine never sees text: it stops
on ids and lengths, and the front-end (`cogvlm2.llm`) aborts a request whose text met a stop string.
"""

from __future__ import annotations

from .detokenizer import IncrementalDetokenizer
from .tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop: list[str], skip_special_tokens: bool = True):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens) if tokenizer else None
        self.stops = stop
        self.hold = max((len(s) for s in stop), default=0)
        self.held = ""  # decoded text not emitted yet: it may begin a stop string
        self.text = ""  # everything emitted so far

    def push(self, token: int) -> tuple[str, str | None]:
        """Feed a generated (non-stop) id; returns (text to emit now, the stop string found or None)."""
        if self.detok is None:
            return "", None
        self.held += self.detok.push(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The request ended without a stop string: release what is held back."""
        if self.detok is None:
            return ""
        self.held += self.detok.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, str | None]:
        found = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if found:
            cut, stop = min(found)
            out, self.held = self.held[:cut], ""
            self.text += out
            return out, stop
        keep = 0 if final else max(self.hold - 1, 0)
        cut = max(len(self.held) - keep, 0)
        out, self.held = self.held[:cut], self.held[cut:]
        self.text += out
        return out, None
