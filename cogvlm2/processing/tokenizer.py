"""The Llama-3 tokenizer of a checkpoint (its `tokenizer.json`) through the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from ..checkpoint import bundled_tokenizer_path

__all__ = ["Tokenizer", "bundled_tokenizer_path", "clean_up_tokenization", "read_clean_up_flag"]


# transformers' `clean_up_tokenization` (4.4x): applied in this order to the whole decoded string.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


def read_clean_up_flag(folder: Path) -> bool:
    """`clean_up_tokenization_spaces` of the checkpoint's tokenizer_config.json (true in the official image and
    caption checkpoints); without the file or the key, transformers 4.4x's default: true."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return True
    try:
        value = json.loads(config.read_text()).get("clean_up_tokenization_spaces", True)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config} is not a JSON object: {e}") from None
    if not isinstance(value, bool):
        raise ValueError(f"{config}: clean_up_tokenization_spaces must be true or false, got {value!r}")
    return value


class Tokenizer:
    """Text <-> ids. Text is always encoded without special tokens: the prompt builder adds BOS.

    Decoding applies the checkpoint's `clean_up_tokenization_spaces` rule (" ." -> ".", " n't" -> "n't",
    ...) as the official transformers tokenizer does, unless `clean_up_tokenization_spaces` says otherwise.
    """

    def __init__(self, path: str | Path, clean_up_tokenization_spaces: bool | None = None):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (official checkpoints ship tokenizer.json)")
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = read_clean_up_flag(path.parent)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up: bool | None = None) -> str:
        """The text of `ids`; `clean_up` None: the checkpoint's rule, False: the raw byte-level decoding."""
        text = self.decode_raw(ids, skip_special_tokens)
        cleaned = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        return clean_up_tokenization(text) if cleaned else text

    def decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
