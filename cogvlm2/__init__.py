"""CogVLM2 vision-language models in plain PyTorch."""
