"""The caption row: its schema (the output's columns) and how a finished or failed item becomes one."""

from __future__ import annotations

from .items import Item
from .preprocess import Preprocessor

CAPTION_SCHEMA = {"id": "string", "path": "string", "caption": "string", "model": "string", "prompt": "string",
                  "template": "string", "tokens": "int64", "prompt_tokens": "int64", "finish_reason": "string",
                  "seconds": "float64", "error": "string"}


def model_label(model: str, adapter: str | None) -> str:
    """The `model` column: the model's name, +ADAPTER when a LoRA adapter captions."""
    return str(model) if adapter is None else f"{model}+{adapter}"


def caption_row(item: Item, model: str, prompt: str | None, template: str | None, caption: str | None = None,
                tokens: int = 0, prompt_tokens: int = 0, finish_reason: str | None = None, seconds: float = 0.0,
                error: str | None = None) -> dict:
    return {"id": item.id, "path": item.path, "caption": caption, "model": model, "prompt": prompt,
            "template": template, "tokens": tokens, "prompt_tokens": prompt_tokens, "finish_reason": finish_reason,
            "seconds": round(seconds, 4), "error": error}


def result_row(item: Item, prep: Preprocessor, model: str, output, error: str | None, seconds: float) -> dict:
    """The caption row of a finished (output) or failed (error) item."""
    try:
        query = prep.query_for(item)
    except ValueError:
        query = None
    template = prep.template_for(item)
    if output is None:
        return caption_row(item, model, query, template, seconds=seconds, error=error)
    return caption_row(item, model, query, template, caption=output.text.strip(), tokens=len(output.token_ids),
                       prompt_tokens=output.prompt_len, finish_reason=output.finish_reason, seconds=seconds)
