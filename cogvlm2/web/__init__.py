"""The browser UI (`cogvlm2 web`, the `web` extra): a Gradio chat over the engine or a running server."""
