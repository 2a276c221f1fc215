"""Incremental detokenization: text deltas from a growing list of ids, never splitting a UTF-8 character,
cleaned up as the checkpoint's tokenizer cleans decoded text."""

from __future__ import annotations

from .tokenizer import CLEAN_UP, Tokenizer, clean_up_tokenization

# Text ending in one of these may still change under the clean-up rule when more text follows (" n" + "'t").
_UNDECIDED = {old[:i] for old, _ in CLEAN_UP for i in range(1, len(old))}
_LONGEST_UNDECIDED = max(map(len, _UNDECIDED))


def final_length(raw: str) -> int:
    """How much of `raw` (uncleaned text, more may follow) is final under the clean-up rule: all but the
    undecided tail. A pattern has a space only at its start, except " ' ", so a cut before the tail's
    first space splits no pattern unless it falls between " '" and " "; then the cut moves before " '"
    (before the whole chain " ' ' ' ...", whose matches depend on where matching started)."""
    for i in range(max(0, len(raw) - _LONGEST_UNDECIDED), len(raw)):
        if raw[i:] in _UNDECIDED:
            while i >= 2 and raw[i - 2:i] == " '":  # a chain " ' ' ' ..." is matched left to right
                i -= 2
            return i
    return len(raw)


class IncrementalDetokenizer:
    """Feed ids as they are generated; get back only the new, complete text.

    Byte-level BPE tokens can end inside a multi-byte character; the decoder then yields U+FFFD. We
    hold such text back until the character completes. Only a short window of ids is re-decoded per
    step (`prefix_offset:`), so the cost per token stays constant. With the tokenizer's clean-up
    rule on, a tail that the next token could still change (a trailing " ", " n", " '") is held back
    too, so the concatenated deltas equal `tokenizer.decode(all ids)`: no space is emitted that the
    clean-up would have removed.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.clean_up = tokenizer.clean_up_tokenization_spaces
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # raw text not emitted yet: its clean-up is still undecided
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode_raw(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int] | int) -> str:
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._emit(full[len(prefix):], final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character, an undecided tail), as decoded."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._emit(full[len(prefix):], final=True)

    def _emit(self, raw: str, final: bool) -> str:
        if self.clean_up:
            self.pending += raw
            cut = len(self.pending) if final else final_length(self.pending)
            raw, self.pending = clean_up_tokenization(self.pending[:cut]), self.pending[cut:]
        self.text += raw
        return raw
