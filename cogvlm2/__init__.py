"""CogVLM2 vision-language models in plain PyTorch."""

_LAZY = {"LLM": "llm", "LLMEngine": "llm", "AsyncLLM": "async_llm", "SamplingParams": "sampling_params"}


def __getattr__(name: str):
    # imported on first use, so `import cogvlm2` stays light
    if name == "caption":  # cogvlm2.caption(...)
        from .batch.caption import caption

        return caption
    if name in _LAZY:  # from cogvlm2 import LLM
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cogvlm2' has no attribute {name!r}")
