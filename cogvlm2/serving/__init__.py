"""The OpenAI-compatible HTTP server (`cogvlm2 serve`): FastAPI routers over the engine's `EngineClient`.

Importing this package needs nothing beyond the core dependencies; FastAPI, uvicorn and friends (the
`serve` extra) are imported by the modules that use them, so `cogvlm2.serving.cli` stays importable.
"""
