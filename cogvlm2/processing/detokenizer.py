"""Incremental detokenization: text deltas from a growing list of ids, never splitting a UTF-8 character."""

from __future__ import annotations

from .tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Feed ids as they are generated; get back only the new, complete text.

    Byte-level BPE tokens can end inside a multi-byte character; the decoder then yields U+FFFD. We
    hold such text back until the character completes. Only a short window of ids is re-decoded per
    step (`prefix_offset:`), so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int] | int) -> str:
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as decoded."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
