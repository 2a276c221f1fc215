"""CogVLM2 vision-language models in plain PyTorch."""


def __getattr__(name: str):
    if name == "caption":  # cogvlm2.caption(...): imported on first use, so `import cogvlm2` stays light
        from .batch.caption import caption

        return caption
    raise AttributeError(f"module 'cogvlm2' has no attribute {name!r}")
